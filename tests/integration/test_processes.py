"""Process-level promises: the API stays free of torch; a worker without a model and a process
without its port say why and exit at once."""

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


def run_until_it_exits(
    module: str, timeout_s: float = 120, **env: str
) -> subprocess.CompletedProcess:
    """A process started with a setting it cannot work with; no Redis answers it."""
    return subprocess.run(
        [sys.executable, "-m", module],
        cwd=REPO_ROOT,
        env=service_env(T2I_REDIS_URL="redis://127.0.0.1:1/0", **env),
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )


def test_worker_without_a_loadable_model_exits_naming_the_setting_and_tiny(tmp_path) -> None:
    result = run_until_it_exits(
        "worker", T2I_MODEL_ID="txt2img-tests/no-such-model", T2I_MODEL_CACHE_DIR=str(tmp_path)
    )
    assert result.returncode == 2
    assert "T2I_MODEL_ID" in result.stderr and "T2I_MODEL_ID=tiny" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_worker_whose_metrics_port_is_taken_exits_naming_the_setting() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        result = run_until_it_exits("worker.webhooks", T2I_WEBHOOK_METRICS_PORT=port)
    assert result.returncode == 2
    assert "T2I_WEBHOOK_METRICS_PORT" in result.stderr and "Traceback" not in result.stderr


def test_an_api_whose_port_is_taken_exits_at_once_naming_the_setting() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        result = run_until_it_exits("api", T2I_PORT=port, timeout_s=10)
    assert result.returncode == 2
    assert f"127.0.0.1:{port}" in result.stderr and "set T2I_PORT" in result.stderr
    assert "Traceback" not in result.stderr


def test_an_api_that_loses_the_race_for_its_port_still_exits(redis_port: int) -> None:
    """The port taken between the check and uvicorn's bind: the application has started, and
    must stop, whatever its housekeeping loops are doing."""
    code = (
        "import socket, uvicorn; taken = socket.create_server(('127.0.0.1', 0)); "
        "uvicorn.run('api.app:create_app', factory=True, port=taken.getsockname()[1])"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO_ROOT,
        env=service_env(
            T2I_REDIS_URL=f"redis://127.0.0.1:{redis_port}/10", T2I_REAP_INTERVAL_S="0.01"
        ),
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert result.returncode != 0
    assert "address already in use" in result.stderr
    assert "Application shutdown complete" in result.stderr
