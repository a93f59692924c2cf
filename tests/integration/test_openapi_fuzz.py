"""schemathesis against the live /openapi.json with a valid key: no 5xx, no answer that breaks
the published schema."""

import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import Stack

st = pytest.importorskip("schemathesis")


def test_schemathesis_finds_no_server_error_and_no_schema_violation(workerless_api: Stack) -> None:
    # No worker behind this API: fuzzed jobs (up to 8 images of 1024x1024) only queue, then expire.
    fuzz_stack = workerless_api
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
