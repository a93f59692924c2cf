"""torch's compile caches kept across restarts, so a restarted worker takes jobs fast.

Two layers, both in the compile cache directory (`T2I_MODEL_CACHE_DIR/inductor`):

- inductor's own on-disk caches (FX graphs with their Triton kernels, AOTAutograd's forward and
  backward graphs, autotuning), turned on by `use_persistent_caches`;
- torch's portable cache ("mega-cache"): after the warm-up compiled its graphs,
  `torch.compiler.save_cache_artifacts()` serializes every artifact those caches hold for them
  into one file, `mega-cache-<fingerprint>.bin`; at the next start, before compiling,
  `torch.compiler.load_cache_artifacts()` puts them back. The file is the whole set a warm start
  needs, in one read, and it survives what the scattered entries do not: a cache directory that
  was pruned or copied from another machine (the fingerprint names the card and the software).
"""

import hashlib
import importlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

ARTIFACTS_PREFIX = "mega-cache-"
ARTIFACTS_SUFFIX = ".bin"

# (config module, attribute, value): what makes a warm restart cheaper, where this torch has it.
_WARM_RESTART_SETTINGS: tuple[tuple[str, str, object], ...] = (
    ("torch._inductor.config", "fx_graph_cache", True),
    # Triton kernels inside the FX graph cache's entries, so the mega-cache carries them too.
    ("torch._inductor.config", "bundle_triton_into_fx_graph_cache", True),
    ("torch._inductor.config", "autotune_local_cache", True),
    # AOTAutograd's graphs cached, so a warm start skips re-running it after dynamo's trace.
    ("torch._functorch.config", "enable_autograd_cache", True),
)


def use_persistent_caches(directory: Path) -> dict[str, object]:
    """Point inductor's caches at `directory` and turn on every local compile cache this torch
    has (remote ones stay off: a worker shares nothing but its disk). Returns what was set."""
    directory.mkdir(parents=True, exist_ok=True)
    # Inductor reads its cache directory from the environment each time it looks it up, and
    # writes its default (a temporary directory) there at its first look, which importing
    # torch's compiler already does: only a directory an operator chose is kept.
    chosen = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if chosen is None or os.path.abspath(chosen) == _default_inductor_dir():
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(directory.resolve())
    applied: dict[str, object] = {}
    for module_name, attribute, value in _WARM_RESTART_SETTINGS:
        module = importlib.import_module(module_name)
        if hasattr(module, attribute):
            setattr(module, attribute, value)
            applied[f"{module_name.split('.')[1].lstrip('_')}.{attribute}"] = value
    return applied


def _default_inductor_dir() -> str | None:
    try:
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir
    except ImportError:
        return None
    return os.path.abspath(default_cache_dir())


def fingerprint(facts: dict[str, Any]) -> str:
    """What compiled graphs depend on, as a short name: card, software, model, levers, shapes."""
    described = {
        **facts,
        "torch": torch.__version__,
        "triton": _triton_version(),
        "cuda": torch.version.cuda,
    }
    digest = hashlib.sha256(json.dumps(described, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:24]


def _triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return str(getattr(triton, "__version__", None))


class CompileArtifacts:
    """One set of torch's portable compile artifacts, in `directory`, named by `facts`."""

    def __init__(self, directory: Path, facts: dict[str, Any]) -> None:
        self.path = directory / f"{ARTIFACTS_PREFIX}{fingerprint(facts)}{ARTIFACTS_SUFFIX}"
        self.loaded = False
        self._misses_when_loaded = 0

    def __str__(self) -> str:
        return str(self.path)

    @staticmethod
    def supported() -> bool:
        return hasattr(torch.compiler, "save_cache_artifacts") and hasattr(
            torch.compiler, "load_cache_artifacts"
        )

    def load(self) -> bool:
        """Put the saved artifacts into torch's caches; call before compiling. False when there
        are none, or they could not be read (the worker then compiles from what is on disk)."""
        if not self.supported() or not self.path.is_file():
            return False
        started = time.perf_counter()
        try:
            info = torch.compiler.load_cache_artifacts(self.path.read_bytes())
        except Exception:
            info = None
        if info is None:
            # torch logs why (a corrupt or foreign file); the caches on disk still serve.
            log.warning("could not load the compile artifacts in %s", self.path)
            return False
        self.loaded = True
        self._misses_when_loaded = _cache_misses()
        log.info(
            "loaded compile artifacts from %s in %.2f s: %s",
            self.path,
            time.perf_counter() - started,
            _summary(info),
        )
        return True

    def save_if_new(self) -> bool:
        """Save, unless everything compiled since loading came from the loaded artifacts: they
        are whole already, and serializing hundreds of MB would delay taking jobs."""
        if self.loaded and _cache_misses() == self._misses_when_loaded:
            return False
        return self.save()

    def save(self) -> bool:
        """Write what this process compiled (or found in the caches) since it started, whole:
        written beside and renamed, so a worker starting meanwhile never reads half a file."""
        if not self.supported():
            return False
        try:
            saved = torch.compiler.save_cache_artifacts()
        except Exception:
            log.warning("could not serialize the compile artifacts", exc_info=True)
            return False
        if saved is None:
            return False
        data, info = saved
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial_path = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
        try:
            partial_path.write_bytes(data)
            partial_path.replace(self.path)
        except OSError:
            log.warning("could not write the compile artifacts to %s", self.path, exc_info=True)
            partial_path.unlink(missing_ok=True)
            return False
        log.info("saved %d bytes of compile artifacts to %s: %s", len(data), self, _summary(info))
        return True


def _cache_misses() -> int:
    """Graphs inductor and AOTAutograd compiled from scratch in this process so far."""
    from torch._dynamo.utils import counters

    return int(
        counters["inductor"]["fxgraph_cache_miss"] + counters["aot_autograd"]["autograd_cache_miss"]
    )


def _summary(info: object) -> dict[str, int]:
    artifacts = getattr(info, "artifacts", None) or {}
    return {kind: len(keys) for kind, keys in artifacts.items()}
