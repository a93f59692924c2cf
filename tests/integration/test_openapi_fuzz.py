"""schemathesis against the live /openapi.json with a valid key: no 5xx, no answer that breaks
the published schema."""

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import Stack

st = pytest.importorskip("schemathesis")


@pytest.fixture(scope="module")
def fuzz_stack(workdir: Path, redis_port: int, model_cache: Path) -> Iterator[Stack]:
    from tests.conftest import _run_stack

    # No worker: fuzzed jobs (up to 8 images of 1024x1024) only queue, then expire.
    yield from _run_stack(
        "fuzz-stack",
        6,
        redis_port,
        workdir,
        model_cache,
        with_worker="no",
        T2I_QUEUE_TIMEOUT_S="1",
        T2I_SWEEP_INTERVAL_S="0.3",
    )


def test_schemathesis_finds_no_server_error_and_no_schema_violation(fuzz_stack: Stack) -> None:
    result = subprocess.run(
        [
            str(Path(sys.executable).with_name("st")),
            "run",
            f"{fuzz_stack.base_url}/openapi.json",
            "--header",
            f"Authorization: Bearer {fuzz_stack.api_key}",
            "--checks",
            "not_a_server_error,response_schema_conformance,status_code_conformance,"
            "content_type_conformance",
            "--phases",
            "examples,coverage,fuzzing",
            "--max-examples",
            "40",
            # /ready answers 503 by design here: this stack has no worker.
            "--exclude-path",
            "/ready",
            "--seed",
            "20261126",
            "--workers",
            "2",
            "--generation-database",
            ":memory:",
            "--no-color",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=fuzz_stack.workdir,
    )
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert "passed" in result.stdout.lower() or "No issues found" in result.stdout
