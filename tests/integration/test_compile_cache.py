"""torch's portable compile cache, with inductor on this CPU: a process that starts with nothing
but the artifacts an earlier one saved compiles from the caches instead of from scratch."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from worker.compile_cache import (
    ARTIFACTS_PREFIX,
    CompileArtifacts,
    fingerprint,
    use_persistent_caches,
)

ROOT = Path(__file__).resolve().parents[2]

# Compiles a small graph the way the worker's warm-up does (inference mode, full graph), between
# loading and saving the artifacts, and prints what the caches did.
CHILD = """
import json, sys
from pathlib import Path
import torch
from torch._dynamo.utils import counters
from worker.compile_cache import CompileArtifacts, use_persistent_caches

directory = Path(sys.argv[1])
use_persistent_caches(directory)
artifacts = CompileArtifacts(directory, {"model": "small"})
loaded = artifacts.load()

def block(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.gelu(x @ x.T + 1.0) * torch.sigmoid(x).sum()

with torch.inference_mode():
    torch.compile(block, fullgraph=True, dynamic=False)(torch.randn(8, 8))
print(json.dumps({
    "loaded": loaded,
    "saved": artifacts.save(),
    "inductor": dict(counters["inductor"]),
    "aot_autograd": dict(counters["aot_autograd"]),
}))
"""


def compile_in_a_new_process(directory: Path) -> dict:
    env = {key: value for key, value in os.environ.items() if key != "TORCHINDUCTOR_CACHE_DIR"}
    env["PYTHONPATH"] = str(ROOT)
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(directory)],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_new_process_with_only_the_saved_artifacts_compiles_from_the_caches(
    tmp_path: Path,
) -> None:
    first_dir, second_dir = tmp_path / "first", tmp_path / "second"
    first = compile_in_a_new_process(first_dir)
    assert not first["loaded"] and first["saved"]
    assert first["inductor"].get("fxgraph_cache_miss", 0) >= 1
    [saved] = first_dir.glob(f"{ARTIFACTS_PREFIX}*")
    # Another machine's cache directory: nothing but the artifacts file.
    second_dir.mkdir()
    (second_dir / saved.name).write_bytes(saved.read_bytes())

    second = compile_in_a_new_process(second_dir)

    assert second["loaded"]
    assert second["inductor"].get("fxgraph_cache_hit", 0) >= 1
    assert second["inductor"].get("fxgraph_cache_miss", 0) == 0
    assert second["aot_autograd"].get("autograd_cache_hit", 0) >= 1
    # Inductor's caches were written where the worker keeps them, not in a temporary directory.
    assert (second_dir / "fxgraph").is_dir()


def test_unreadable_artifacts_are_skipped(tmp_path: Path) -> None:
    artifacts = CompileArtifacts(tmp_path, {"model": "small"})
    assert not artifacts.load()
    artifacts.path.write_bytes(b"half a file")
    assert not artifacts.load()
    assert not artifacts.loaded


def test_the_artifacts_are_named_by_what_the_graphs_depend_on(tmp_path: Path) -> None:
    facts = {"card": "NVIDIA H100 80GB HBM3", "model": "sd15", "compiled": [1, 8]}
    assert fingerprint(facts) == fingerprint(dict(reversed(facts.items())))
    assert fingerprint(facts) != fingerprint({**facts, "card": "NVIDIA H200"})
    assert fingerprint(facts) != fingerprint({**facts, "compiled": [1]})
    assert CompileArtifacts(tmp_path, facts).path.parent == tmp_path


def test_the_cache_directory_replaces_torchs_default_but_not_an_operators(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", default_cache_dir())
    applied = use_persistent_caches(tmp_path / "ours")
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str((tmp_path / "ours").resolve())
    assert applied.get("inductor.fx_graph_cache") is True

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "operator's"))
    use_persistent_caches(tmp_path / "ours")
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "operator's")
