"""Console entry points of the installed service: `txt2img-api`, `txt2img-worker`,
`txt2img-webhooks` and `txt2img-keys`."""

import importlib.util
import runpy
import sys
from pathlib import Path


def service_root() -> Path:
    """The directory that holds the service's `api`, `shared` and `worker` packages."""
    spec = importlib.util.find_spec("txt2img_service.shared")
    if spec is None or spec.origin is None:
        raise RuntimeError("txt2img_service is installed without its shared package")
    return Path(spec.origin).parents[1]


def run(module: str) -> None:
    """Run `python -m module` of the service, its own packages first on this process's path."""
    root = str(service_root())
    if sys.path[:1] != [root]:
        sys.path.insert(0, root)
    runpy.run_module(module, run_name="__main__", alter_sys=True)


def api() -> None:
    run("api")


def worker() -> None:
    run("worker")


def webhooks() -> None:
    run("worker.webhooks")


def keys() -> None:
    run("shared.keyadmin")
