"""The two distributions as others install them: the thin client into a fresh virtualenv, and the
service next to an integrator's own `api`, `shared` and `worker` packages."""

import io
import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from PIL import Image

from tests.support import REPO_ROOT, Stack, service_env

SERVICE_PACKAGES = ("api", "shared", "worker")
SERVER_SIDE_DISTRIBUTIONS = {"celery", "kombu", "redis", "boto3", "botocore", "torch", "fastapi"}
INSTALL_TIMEOUT_S = 300
_NOT_SOURCES = {".git", ".venv", "data", "build", "tests", "bench", "__pycache__", "client"}


def run(*args: str | Path, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [str(arg) for arg in args],
        cwd=cwd,
        env=service_env(**env),
        capture_output=True,
        text=True,
        timeout=INSTALL_TIMEOUT_S,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def build_wheel(source: Path, into: Path) -> Path:
    """The wheel of a copy of `source`: setuptools' build folder never sees the checkout."""
    tree = into / "source"
    shutil.copytree(
        source,
        tree,
        ignore=lambda folder, names: [
            n for n in names if n in _NOT_SOURCES or n.endswith(".egg-info")
        ],
    )
    run(
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "--quiet",
        "--no-deps",
        "--no-build-isolation",
        "--wheel-dir",
        into,
        tree,
        cwd=into,
    )
    [wheel] = into.glob("*.whl")
    return wheel


def top_level_names(wheel: Path) -> set[str]:
    with zipfile.ZipFile(wheel) as archive:
        return {name.split("/")[0] for name in archive.namelist() if ".dist-info/" not in name}


@pytest.fixture(scope="module")
def service_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_wheel(REPO_ROOT, tmp_path_factory.mktemp("service-wheel"))


def test_the_service_wheel_installs_its_packages_only_inside_txt2img_service(
    service_wheel: Path,
) -> None:
    assert top_level_names(service_wheel) == {"txt2img_service"}
    with zipfile.ZipFile(service_wheel) as archive:
        shipped = {name for name in archive.namelist() if name.endswith(".py")}
        playground = {name for name in archive.namelist() if "/playground/" in name}
    assert playground == {
        "txt2img_service/api/playground/index.html",
        "txt2img_service/api/playground/playground.js",
    }
    sources = {
        f"txt2img_service/{path.relative_to(REPO_ROOT)}"
        for package in SERVICE_PACKAGES
        for path in (REPO_ROOT / package).rglob("*.py")
    }
    assert sources and sources <= shipped, sorted(sources - shipped)


def test_the_installed_service_leaves_an_integrators_packages_alone(
    service_wheel: Path, tmp_path: Path, redis_port: int
) -> None:
    site = tmp_path / "site"
    run(
        sys.executable,
        "-m",
        "pip",
        "install",
        "--quiet",
        "--no-deps",
        "--target",
        site,
        service_wheel,
        cwd=tmp_path,
    )
    integrator = tmp_path / "integrator"
    for package in SERVICE_PACKAGES:
        (integrator / package).mkdir(parents=True)
        (integrator / package / "__init__.py").write_text("OWNER = 'integrator'\n")

    # The integrator's code sees its own packages, whichever comes first on the path.
    for path in (f"{site}:{integrator}", f"{integrator}:{site}"):
        probe = run(
            sys.executable,
            "-c",
            "import json, api, shared, worker; from txt2img_service.launch import service_root;"
            "print(json.dumps([api.OWNER, shared.OWNER, worker.OWNER, str(service_root())]))",
            cwd=tmp_path,
            PYTHONPATH=path,
        )
        *owners, root = json.loads(probe.stdout)
        assert owners == ["integrator"] * 3
        assert Path(root) == site / "txt2img_service"

    # The service's own entry point runs its own `shared`, though the integrator's comes first.
    listed = run(
        site / "bin" / "txt2img-keys",
        "list",
        cwd=tmp_path,
        PYTHONPATH=f"{integrator}:{site}",
        T2I_REDIS_URL=f"redis://127.0.0.1:{redis_port}/14",
    )
    assert listed.stdout.strip() == "no API keys"


def test_the_client_installs_alone_into_a_fresh_venv_and_generates(
    local_stack: Stack, tmp_path: Path
) -> None:
    client_wheel = build_wheel(REPO_ROOT / "client", tmp_path / "wheel")
    assert top_level_names(client_wheel) == {"txt2img"}
    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", venv, cwd=tmp_path)
    run(venv / "bin" / "pip", "install", "--quiet", client_wheel, cwd=tmp_path)

    listed = run(venv / "bin" / "pip", "list", "--format=json", cwd=tmp_path)
    installed = {package["name"].lower() for package in json.loads(listed.stdout)}
    assert {"txt2img-client", "httpx"} <= installed
    assert not installed & SERVER_SIDE_DISTRIBUTIONS, installed & SERVER_SIDE_DISTRIBUTIONS
    no_server_code = run(
        venv / "bin" / "python",
        "-c",
        "import importlib.util as u; print([m for m in ('api', 'shared', 'worker', 'txt2img')"
        " if u.find_spec(m)])",
        cwd=tmp_path,
    )
    assert no_server_code.stdout.strip() == "['txt2img']"

    version = run(venv / "bin" / "txt2img", "--version", cwd=tmp_path)
    assert version.stdout.strip() == "txt2img 0.1.0"
    generated = run(
        venv / "bin" / "txt2img",
        "generate",
        "a lighthouse from a fresh venv",
        "-o",
        "lighthouse.png",
        "-W",
        "256",
        "-H",
        "320",
        "-s",
        "4",
        "--seed",
        "11",
        cwd=tmp_path,
        T2I_API_URL=local_stack.base_url,
        T2I_API_KEY=local_stack.api_key,
    )
    assert generated.stdout.splitlines()[-1] == "saved lighthouse.png"
    image = Image.open(io.BytesIO((tmp_path / "lighthouse.png").read_bytes()))
    assert (image.format, image.size) == ("PNG", (256, 320))
    assert "Seed: 11" in image.info["parameters"]
