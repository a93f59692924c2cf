"""What the GPU executor does when a render goes wrong: non-finite images, running out of
memory, and a warm-up that must happen on the thread that renders. Real tiny pipeline, on CPU."""

import sys
import threading
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from shared.schema import JobErrorType
from tests.integration.test_batching import hold_gpu, item, job, outcomes
from worker.executor import GpuExecutor, RenderJob
from worker.jobs import _error_type
from worker.kinds import load_renderer
from worker.pipeline import (
    DiffusionRenderer,
    NonFiniteImage,
    RenderBatch,
    RenderedImages,
    StepCallback,
)


@pytest.fixture(scope="module")
def renderer(model_cache: Path) -> DiffusionRenderer:
    return load_renderer("tiny", model_cache, "cpu")


@pytest.fixture
def second_image_overflows(renderer: DiffusionRenderer) -> Iterator[None]:
    """The decoder's output for the second image of any batch turns NaN, as an fp16 overflow
    would make it."""

    def poison(module: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        if output.shape[0] > 1:
            output[1] = float("nan")
        return output

    handle = renderer.pipeline.vae.decoder.register_forward_hook(poison)
    yield
    handle.remove()


@pytest.mark.usefixtures("second_image_overflows")
def test_a_non_finite_image_is_reported_not_returned_black(renderer: DiffusionRenderer) -> None:
    first, second = renderer.render(job(item(1), item(2)))
    assert not isinstance(first, NonFiniteImage)
    assert first.size == (64, 64)
    assert isinstance(second, NonFiniteImage)


@pytest.mark.usefixtures("second_image_overflows")
def test_a_non_finite_image_fails_only_its_own_job(renderer: DiffusionRenderer) -> None:
    executor = GpuExecutor(renderer.render, max_batch_images=4, batch_wait_s=0.05)
    try:
        release = hold_gpu(executor)
        fine = executor.submit(RenderJob(job(item(1))))
        broken = executor.submit(RenderJob(job(item(2))))
        release.set()
        [result] = outcomes([fine])
        assert result.batch_images == 2
        with pytest.raises(NonFiniteImage) as failure:
            broken.result(timeout=60)
    finally:
        executor.shutdown()
    assert _error_type(failure.value) is JobErrorType.NUMERICAL_ERROR


class OutOfMemoryAbove:
    """The real renderer, except that a batch of more than `limit` images runs out of memory
    after allocating scratch memory, as a CUDA OOM would leave it referenced by the traceback."""

    def __init__(self, renderer: DiffusionRenderer, limit: int) -> None:
        self.renderer = renderer
        self.limit = limit
        self.calls: list[int] = []
        self.scratch: list[weakref.ref] = []
        self.inside_except_block: list[bool] = []

    def __call__(self, batch: RenderBatch, on_step: StepCallback | None) -> RenderedImages:
        self.calls.append(len(batch.items))
        self.inside_except_block.append(sys.exc_info()[0] is not None)
        # Every earlier failed call's memory must be free by the time a retry starts.
        assert all(ref() is None for ref in self.scratch), "a failed batch's memory is still held"
        if len(batch.items) > self.limit:
            scratch = torch.empty(4_000_000)
            self.scratch.append(weakref.ref(scratch))
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self.renderer.render(batch, on_step)


def test_a_batch_out_of_memory_is_retried_smaller_outside_the_except_block(
    renderer: DiffusionRenderer,
) -> None:
    render = OutOfMemoryAbove(renderer, limit=1)
    executor = GpuExecutor(render, max_batch_images=4, batch_wait_s=0.05)
    try:
        release = hold_gpu(executor)
        futures = [executor.submit(RenderJob(job(item(seed)))) for seed in (1, 2, 3)]
        release.set()
        results = outcomes(futures)
    finally:
        executor.shutdown()
    # The gate, the batch of three, then halves: one job alone, two together, then each alone.
    assert render.calls == [1, 3, 1, 2, 1, 1]
    assert not any(render.inside_except_block)
    assert [result.batch_images for result in results] == [1, 1, 1]
    assert len(render.scratch) == 2


def test_a_single_job_out_of_memory_fails_with_a_typed_error(renderer: DiffusionRenderer) -> None:
    executor = GpuExecutor(OutOfMemoryAbove(renderer, limit=1), max_batch_images=4)
    try:
        future = executor.submit(RenderJob(job(item(1), item(2))))
        with pytest.raises(torch.OutOfMemoryError) as failure:
            future.result(timeout=60)
        # The executor goes on with the next job.
        assert outcomes([executor.submit(RenderJob(job(item(3))))])[0].batch_images == 1
    finally:
        executor.shutdown()
    assert _error_type(failure.value) is JobErrorType.OUT_OF_MEMORY


def test_the_warm_up_runs_on_the_thread_that_renders_before_any_job(
    renderer: DiffusionRenderer,
) -> None:
    threads: list[tuple[str, int]] = []

    def render(batch: RenderBatch, on_step: StepCallback | None) -> RenderedImages:
        threads.append(("render", threading.get_ident()))
        return renderer.render(batch, on_step)

    def warm_up() -> None:
        threads.append(("warm-up", threading.get_ident()))
        renderer.warm_up(64, 64)

    executor = GpuExecutor(render, warm_up=warm_up)
    try:
        future = executor.submit(RenderJob(job(item(1))))
        executor.wait_ready(timeout=60)
        outcomes([future])
    finally:
        executor.shutdown()
    assert [kind for kind, _ in threads] == ["warm-up", "render"]
    assert len({ident for _, ident in threads}) == 1
    assert threads[0][1] != threading.get_ident()


def test_warm_up_work_left_for_idle_time_runs_only_while_no_job_waits(
    renderer: DiffusionRenderer,
) -> None:
    order: list[str] = []
    executor: GpuExecutor
    constructed = threading.Event()

    def render(batch: RenderBatch, on_step: StepCallback | None) -> RenderedImages:
        order.append("job")
        return renderer.render(batch, on_step)

    def job_arrives() -> None:
        order.append("idle 1")
        executor.submit(RenderJob(job(item(1))))

    def fails() -> None:
        order.append("idle 2")
        raise RuntimeError("a warm-up render failed")

    def warm_up() -> list[Callable[[], object]]:
        constructed.wait()  # the executor's thread starts its warm-up in the constructor
        return [job_arrives, fails, lambda: order.append("idle 3")]

    executor = GpuExecutor(render, warm_up=warm_up)
    constructed.set()
    try:
        executor.wait_ready(timeout=60)
        assert executor.wait_fully_warm(timeout=60)
        # A failed piece of idle work leaves the executor taking jobs.
        outcomes([executor.submit(RenderJob(job(item(2))))])
    finally:
        executor.shutdown()
    assert order == ["idle 1", "job", "idle 2", "idle 3", "job"]


def test_a_failed_warm_up_is_raised_to_whoever_waits_for_the_executor() -> None:
    def warm_up() -> None:
        raise RuntimeError("no GPU memory left for the warm-up")

    executor = GpuExecutor(lambda batch, on_step: [], warm_up=warm_up)
    with pytest.raises(RuntimeError, match="warm-up"):
        executor.wait_ready(timeout=60)
