"""bench/gpu_service.py's smoke mode: the bare executor, then its own redis-server, the API and a
tiny-model worker, driven over HTTP, all on this CPU. It proves the benchmark runs end to end;
its figures mean nothing here."""

import json
import subprocess
import sys
from pathlib import Path

from tests.support import REPO_ROOT, service_env


def test_the_smoke_run_measures_the_bare_executor_and_the_service(
    model_cache: Path, tmp_path: Path
) -> None:
    out = tmp_path / "service.json"
    # Fewer clients than the smoke default, one API process: every phase runs, in less time.
    command = [sys.executable, "-m", "bench.gpu_service", "--smoke", "--clients", "1,2"]
    command += ["--api-processes", "1", "--cache-dir", str(model_cache), "--out", str(out)]
    command += ["--logs", str(tmp_path / "services.log")]
    finished = subprocess.run(
        command, cwd=REPO_ROOT, env=service_env(), capture_output=True, text=True, timeout=240
    )
    assert finished.returncode == 0, finished.stderr[-4000:]
    figures = json.loads(out.read_text())
    assert figures == json.loads(finished.stdout)
    assert figures["gpu"] == "cpu"
    assert figures["config"]["smoke"] and figures["config"]["clients"] == [1, 2]
    assert figures["bare_executor"]["ours_throughput_images_per_s"] > 0
    for clients in (1, 2):
        level = figures["service"][f"c{clients}"]
        assert level["jobs"] == clients
        assert level["images_per_s"] > 0
        assert level["latency_p95_s"] >= level["latency_p50_s"] > 0
        # CPU times tick in 10 ms: a job or two may read as none.
        assert level["api_cpu_ms_per_job"] >= 0
    assert figures["service_efficiency"] > 0
    logs = (tmp_path / "services.log").read_text()
    assert "==== api" in logs and "==== worker" in logs
