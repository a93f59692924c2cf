"""bench/gpu_pipeline.py's smoke mode for SDXL: plain diffusers' SDXL pipeline, our executor and a
cold start, with the tiny SDXL model on this CPU. It proves the benchmark runs end to end; its
figures mean nothing here."""

import json
import subprocess
import sys
from pathlib import Path

from tests.support import REPO_ROOT, service_env


def test_the_sdxl_smoke_run_measures_plain_diffusers_ours_and_a_cold_start(
    model_cache: Path, tmp_path: Path
) -> None:
    out = tmp_path / "sdxl.json"
    command = [sys.executable, "-m", "bench.gpu_pipeline", "--smoke", "--family", "sdxl"]
    command += ["--jobs", "2", "--cache-dir", str(model_cache), "--out", str(out)]
    finished = subprocess.run(
        command, cwd=REPO_ROOT, env=service_env(), capture_output=True, text=True, timeout=240
    )
    assert finished.returncode == 0, finished.stderr[-4000:]
    figures = json.loads(out.read_text())
    assert figures == json.loads(finished.stdout)
    assert figures["gpu"] == "cpu"
    assert figures["config"]["family"] == "sdxl" and figures["config"]["smoke"]
    assert figures["config"]["max_batch_pixels"] > 0
    for key in ("seed_baseline_s_per_image", "diffusers_dpm25_s_per_image", "ours_b1_s_per_image"):
        assert figures[key] > 0
    assert figures["ours_throughput_images_per_s"] > 0
    assert figures["ours_non_finite_images"] == 0
    assert figures["cold_start_warm_cache_s"] > 0
