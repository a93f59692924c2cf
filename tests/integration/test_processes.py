"""Process-level promises: the API stays free of torch; a worker without a model says why."""

import socket
import subprocess
import sys

from tests.support import REPO_ROOT, service_env


def test_importing_and_building_the_api_loads_no_torch() -> None:
    code = (
        "import sys; from api.app import create_app; create_app(); "
        "heavy = sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules); "
        "print(heavy); sys.exit(1 if heavy else 0)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, env=service_env(), capture_output=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_worker_without_a_loadable_model_exits_naming_the_setting_and_tiny(tmp_path) -> None:
    env = service_env(
        T2I_MODEL_ID="txt2img-tests/no-such-model",
        T2I_MODEL_CACHE_DIR=str(tmp_path),
        T2I_REDIS_URL="redis://127.0.0.1:1/0",
    )
    result = subprocess.run(
        [sys.executable, "-m", "worker"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "T2I_MODEL_ID" in result.stderr and "T2I_MODEL_ID=tiny" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_worker_whose_metrics_port_is_taken_exits_naming_the_setting() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        env = service_env(
            T2I_WEBHOOK_METRICS_PORT=str(taken.getsockname()[1]),
            T2I_REDIS_URL="redis://127.0.0.1:1/0",
        )
        result = subprocess.run(
            [sys.executable, "-m", "worker.webhooks"],
            cwd=REPO_ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode == 2
    assert "T2I_WEBHOOK_METRICS_PORT" in result.stderr and "Traceback" not in result.stderr
