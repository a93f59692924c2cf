"""The one thread that owns the pipeline; task threads hand it work and wait for images."""

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


@dataclass
class _Work:
    batch: RenderBatch
    on_step: StepCallback | None
    future: Future[list[Image]] = field(default_factory=Future)


class GpuExecutor:
    """Serialises GPU work on one thread, so the pipeline is never used concurrently."""

    def __init__(self, render: RenderFunction) -> None:
        self._render = render
        self._queue: queue.Queue[_Work | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="gpu-executor", daemon=True)
        self._thread.start()

    def submit(
        self, batch: RenderBatch, on_step: StepCallback | None = None
    ) -> Future[list[Image]]:
        work = _Work(batch, on_step)
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
                work.future.set_result(self._render(work.batch, work.on_step))
            except BaseException as exc:
                work.future.set_exception(exc)
