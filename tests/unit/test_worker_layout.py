"""The worker's structure: imports flow one way (job kinds depend on the render core, never the
reverse), and production code does not load the test hooks unless settings ask for them."""

import ast
import subprocess
import sys
from pathlib import Path

WORKER = Path(__file__).resolve().parents[2] / "worker"
# Loaded only where T2I_MODEL_ID=tiny, "tiny" ControlNets or the debug settings ask for them.
TEST_HOOKS = {"worker.faults", "worker.tiny_model", "worker.tiny_customization"}


def module_imports() -> dict[str, set[str]]:
    """Each worker module's imports of other worker modules, at any depth of its code."""
    graph: dict[str, set[str]] = {}
    for path in WORKER.glob("*.py"):
        name = f"worker.{path.stem}"
        imported: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                if node.module == "worker":
                    imported.update(f"worker.{alias.name}" for alias in node.names)
                elif node.module.startswith("worker."):
                    imported.add(node.module)
            elif isinstance(node, ast.Import):
                imported.update(a.name for a in node.names if a.name.startswith("worker."))
        graph[name] = imported - {name}
    return graph


def cycle_from(graph: dict[str, set[str]], start: str) -> list[str] | None:
    """An import path from `start` back to itself, if there is one."""
    stack = [(start, [start])]
    seen: set[str] = set()
    while stack:
        node, path = stack.pop()
        for child in sorted(graph.get(node, ())):
            if child == start:
                return [*path, child]
            if child not in seen:
                seen.add(child)
                stack.append((child, [*path, child]))
    return None


def test_the_worker_has_no_import_circle() -> None:
    graph = module_imports()
    assert "worker.kinds" in graph and "worker.pipeline" in graph
    cycles = [cycle for name in graph if (cycle := cycle_from(graph, name))]
    assert cycles == []


def test_the_render_core_imports_no_job_kind() -> None:
    graph = module_imports()
    assert "worker.pipeline" in graph["worker.kinds"]
    assert "worker.kinds" not in graph["worker.pipeline"]
    assert not graph["worker.pipeline"] & {"worker.controlnet", "worker.kinds"}


def test_a_production_worker_loads_no_test_hooks() -> None:
    """Importing the worker's entry point, as `python -m worker` does before it reads settings."""
    loaded = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, worker.__main__; print(' '.join(sorted(sys.modules)))",
        ],
        capture_output=True,
        text=True,
        check=True,
        cwd=WORKER.parent,
        timeout=120,
    ).stdout.split()
    assert "worker.jobs" in loaded and "worker.pipeline" in loaded
    assert TEST_HOOKS.isdisjoint(loaded)
