"""The compiled UNet, with inductor on this CPU: warmed once on the executor's thread, then every
scheduler renders through the compiled graph with no recompile."""

import contextlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from torch._dynamo.utils import counters

from tests.integration.test_batching import item, job
from worker.compile_cache import ARTIFACTS_PREFIX
from worker.executor import GpuExecutor, RenderJob
from worker.kinds import load_renderer
from worker.pipeline import RENDER_COSTS_FILE, DiffusionRenderer, RenderCostCache, SpeedLevers

SCHEDULERS = ["dpmpp_2m", "dpmpp_2m_karras", "euler", "euler_a", "ddim", "pndm", "lms", "unipc"]
SIZE = 64


@pytest.fixture(scope="module")
def compiled_renderer(
    model_cache: Path, tmp_path_factory: pytest.TempPathFactory
) -> DiffusionRenderer:
    renderer = load_renderer("tiny", model_cache, "cpu")
    renderer.apply(SpeedLevers(compile=True), tmp_path_factory.mktemp("compiled") / "inductor")
    return renderer


@pytest.fixture(scope="module")
def compiled(compiled_renderer: DiffusionRenderer) -> Iterator[GpuExecutor]:
    renderer = compiled_renderer
    graphs_before = counters["stats"]["unique_graphs"]
    executor = GpuExecutor(
        renderer.render,
        max_batch_images=2,
        key=renderer.batch_key,
        warm_up=lambda: renderer.warm_up(SIZE, SIZE, compiled_counts=(1,), max_images=2),
    )
    executor.wait_ready(timeout=900)
    # One image count compiled at one size: one graph.
    assert counters["stats"]["unique_graphs"] - graphs_before == 1
    yield executor
    executor.shutdown()


@pytest.fixture(scope="module")
def eager(model_cache: Path) -> DiffusionRenderer:
    return load_renderer("tiny", model_cache, "cpu")


@contextlib.contextmanager
def no_recompile() -> Iterator[None]:
    graphs_before = counters["stats"]["unique_graphs"]
    previous = torch._dynamo.config.error_on_recompile
    torch._dynamo.config.error_on_recompile = True
    try:
        yield
    finally:
        torch._dynamo.config.error_on_recompile = previous
    assert counters["stats"]["unique_graphs"] == graphs_before


@pytest.fixture
def no_recompiles() -> Iterator[None]:
    with no_recompile():
        yield


@pytest.mark.usefixtures("no_recompiles")
@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_every_scheduler_renders_compiled_after_warm_up_without_a_recompile(
    compiled: GpuExecutor, eager: DiffusionRenderer, scheduler: str
) -> None:
    batch = job(item(7), size=SIZE, scheduler=scheduler)
    [image] = compiled.submit(RenderJob(batch)).result(timeout=300).images
    [reference] = eager.render(batch)
    difference = np.abs(np.asarray(image, np.int16) - np.asarray(reference, np.int16)).max()
    assert difference <= 2


@pytest.mark.usefixtures("no_recompiles")
def test_shapes_not_warmed_render_eager_instead_of_compiling(compiled: GpuExecutor) -> None:
    for batch in [job(item(1), item(2), size=SIZE), job(item(3), size=SIZE + 8)]:
        images = compiled.submit(RenderJob(batch)).result(timeout=300).images
        assert len(images) == len(batch.items)


def test_a_restart_with_cached_timings_leaves_the_counts_not_compiled_for_idle_time(
    compiled: GpuExecutor, compiled_renderer: DiffusionRenderer
) -> None:
    renderer = compiled_renderer
    timed = dict(renderer.render_costs[(SIZE, SIZE)])
    assert set(timed) == {1, 2}
    renderer.warm_up_seconds.clear()
    # Another start on the same card, software and settings (here, the same process again).
    left_for_idle_time = renderer.warm_up(SIZE, SIZE, compiled_counts=(1,), max_images=2)
    assert "time every count" not in renderer.warm_up_seconds
    assert renderer.render_costs[(SIZE, SIZE)] == timed
    assert len(left_for_idle_time) == 1  # the first render of two images, not compiled
    left_for_idle_time[0]()
    # Another setting is another fingerprint: timed anew, nothing left for later.
    assert renderer.warm_up(SIZE, SIZE, compiled_counts=(1,), max_images=3) == []
    assert "time every count" in renderer.warm_up_seconds
    assert set(renderer.render_costs[(SIZE, SIZE)]) == {1, 2, 3}


def test_the_warm_up_keeps_torchs_compile_artifacts_beside_the_compiled_kernels(
    compiled: GpuExecutor, compiled_renderer: DiffusionRenderer
) -> None:
    directory = compiled_renderer._compile_cache_dir
    assert directory is not None
    [artifacts] = directory.glob(f"{ARTIFACTS_PREFIX}*")
    assert artifacts.stat().st_size > 0
    assert (artifacts.parent / RENDER_COSTS_FILE).is_file()


def test_a_restart_with_every_cache_warm_compiles_the_other_counts_while_no_job_waits(
    compiled: GpuExecutor, compiled_renderer: DiffusionRenderer
) -> None:
    renderer = compiled_renderer
    recompiles = renderer.recompiles
    # The first start with counts 1 and 2 compiles both, then saves its artifacts and timings.
    assert renderer.warm_up(SIZE, SIZE, compiled_counts=(1, 2), max_images=2) == []
    assert "compile 2" in renderer.warm_up_seconds
    renderer.warm_up_seconds.clear()

    # Another start on the same card, software and settings (here, the same process again).
    left_for_idle_time = renderer.warm_up(SIZE, SIZE, compiled_counts=(1, 2), max_images=2)

    assert "compile 1" in renderer.warm_up_seconds
    assert "compile 2" not in renderer.warm_up_seconds
    assert "load compile artifacts" in renderer.warm_up_seconds
    assert len(left_for_idle_time) == 1  # one graph: the plain variant of two images
    # Padding takes a count once its last graph is compiled (in a new process, not before).
    renderer._compiled_counts[(SIZE, SIZE)] = {1}
    left_for_idle_time[0]()
    assert renderer._compiled_counts[(SIZE, SIZE)] == {1, 2}
    assert renderer.recompiles == recompiles


def test_unreadable_cached_timings_are_timed_again(tmp_path: Path) -> None:
    cache = RenderCostCache(tmp_path / RENDER_COSTS_FILE)
    assert cache.get("card") is None
    cache.put("card", {1: 0.5, 8: 1.5})
    cache.put("other card", {1: 0.25})
    assert cache.get("card") == {1: 0.5, 8: 1.5}
    assert cache.get("other card") == {1: 0.25}
    cache.path.write_text("{ half a file")
    assert cache.get("card") is None
    cache.path.write_text('{"card": {"1": "fast"}}')
    assert cache.get("card") is None


def test_the_compiled_vae_decodes_as_eager_one_image_per_graph_and_other_sizes_eager(
    model_cache: Path, eager: DiffusionRenderer, tmp_path: Path
) -> None:
    renderer = load_renderer("tiny", model_cache, "cpu")
    renderer.apply(SpeedLevers(compile_vae=True), tmp_path / "inductor")
    graphs_before = counters["stats"]["unique_graphs"]
    renderer.warm_up(SIZE, SIZE)
    assert counters["stats"]["unique_graphs"] - graphs_before == 1
    with no_recompile():
        for batch in [job(item(1), item(2), item(3), size=SIZE), job(item(4), size=SIZE + 8)]:
            pairs = zip(renderer.render(batch), eager.render(batch), strict=True)
            for image, reference in pairs:
                difference = np.asarray(image, np.int16) - np.asarray(reference, np.int16)
                assert np.abs(difference).max() <= 2
    assert renderer.recompiles == 0
