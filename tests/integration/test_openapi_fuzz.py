"""schemathesis against the live /openapi.json with a valid key and every check it has: no 5xx,
no answer (status, content type, headers, body) that breaks the published schema, invalid input
refused, valid input accepted, auth enforced, and the stateful phase following the links from
POST /v1/jobs to the job's routes. Single-threaded: hypothesis on CPython 3.11 fails with "AST
constructor recursion depth mismatch" when several threads generate at once."""

import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.support import REPO_ROOT, Stack, service_env

# The routes that render before they answer, and need a worker to answer anything but 5xx.
RENDERING_ROUTES = "^/(sdapi/|v1/images/)"


def schemathesis(stack: Stack, *options: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            str(Path(sys.executable).with_name("st")),
            "run",
            f"{stack.base_url}/openapi.json",
            "--header",
            f"Authorization: Bearer {stack.api_key}",
            "--checks",
            "all",
            "--seed",
            "20261126",
            # One worker: hypothesis is not thread-safe on CPython 3.11 (ast.parse from two
            # threads fails with "AST constructor recursion depth mismatch").
            "--workers",
            "1",
            "--generation-database",
            ":memory:",
            "--no-color",
            *options,
        ],
        env=service_env(SCHEMATHESIS_HOOKS="tests.schemathesis_hooks", PYTHONPATH=str(REPO_ROOT)),
        capture_output=True,
        text=True,
        timeout=600,
        cwd=stack.workdir,
    )


def operations_tested(output: str) -> int:
    match = re.search(r"Tested: (\d+)", output)
    return int(match.group(1)) if match else 0


@pytest.mark.timeout(600)
def test_the_job_routes_pass_every_check_and_the_stateful_phase(workerless_api: Stack) -> None:
    # No worker behind this API: fuzzed jobs only queue, then expire. /ready answers 503 by
    # design without a worker; it is fuzzed below, with one.
    result = schemathesis(
        workerless_api,
        "--phases",
        "examples,coverage,fuzzing,stateful",
        "--max-examples",
        "40",
        "--exclude-path",
        "/ready",
        "--exclude-path-regex",
        RENDERING_ROUTES,
    )
    assert result.returncode == 0, result.stdout[-8000:] + result.stderr[-2000:]
    assert operations_tested(result.stdout) >= 12
    links = re.search(r"API Links:\s+(\d+) covered", result.stdout)
    assert links and int(links.group(1)) >= 5, result.stdout[-3000:]


@pytest.mark.timeout(600)
def test_the_rendering_routes_and_readiness_pass_every_check_with_a_worker(
    local_stack: Stack,
) -> None:
    routes = ("--include-path-regex", f"{RENDERING_ROUTES}|^/(ready|health)$")
    # Every operation the document declares on those paths is tested.
    document = httpx.get(f"{local_stack.base_url}/openapi.json", timeout=10).json()
    declared = sum(
        len(operations)
        for path, operations in document["paths"].items()
        if re.search(routes[1], path)
    )
    assert declared >= 20
    # Each valid request renders, on a CPU: the coverage phase's hundreds of boundary cases go
    # in invalid only; valid ones come from the examples and the fuzzer.
    for options in (
        ("--phases", "coverage", "--mode", "negative"),
        ("--phases", "examples,fuzzing", "--max-examples", "8"),
    ):
        result = schemathesis(local_stack, *options, *routes)
        assert result.returncode == 0, result.stdout[-8000:] + result.stderr[-2000:]
        assert operations_tested(result.stdout) == declared
