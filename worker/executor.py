"""The one thread that owns the pipeline; task threads hand it jobs and wait for images."""

import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

from PIL.Image import Image

from worker.pipeline import RenderBatch, StepCallback

log = logging.getLogger(__name__)

RenderFunction = Callable[[RenderBatch, StepCallback | None], list[Image]]


class RenderCanceled(Exception):
    """The job was canceled before or while it rendered."""


@dataclass(frozen=True)
class RenderJob:
    """One job's images, with how to report its progress and how to tell it was canceled."""

    batch: RenderBatch
    on_step: StepCallback | None = None
    is_canceled: Callable[[], bool] = lambda: False


@dataclass
class _Work:
    job: RenderJob
    future: Future[list[Image]] = field(default_factory=Future)


class GpuExecutor:
    """Serialises GPU work on one thread, so the pipeline is never used concurrently."""

    def __init__(self, render: RenderFunction) -> None:
        self._render = render
        self._queue: queue.Queue[_Work | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="gpu-executor", daemon=True)
        self._thread.start()

    def submit(self, job: RenderJob) -> Future[list[Image]]:
        """Images for the job, or RenderCanceled, or whatever the render raised."""
        work = _Work(job)
        self._queue.put(work)
        return work.future

    def shutdown(self) -> None:
        self._queue.put(None)
        self._thread.join()

    def _run(self) -> None:
        while (work := self._queue.get()) is not None:
            if not work.future.set_running_or_notify_cancel():
                continue
            try:
                work.future.set_result(self._render_one(work.job))
            except BaseException as exc:
                work.future.set_exception(exc)

    def _render_one(self, job: RenderJob) -> list[Image]:
        if job.is_canceled():
            raise RenderCanceled()

        def on_step(step: int, total: int) -> None:
            if job.on_step is not None:
                job.on_step(step, total)
            # Raising inside the step callback stops the pipeline at once, skipping the decode.
            if step < total and job.is_canceled():
                raise RenderCanceled()

        return self._render(job.batch, on_step)
