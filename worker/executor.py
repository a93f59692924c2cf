"""The one thread that owns the pipeline; task threads hand it jobs and wait for images.

Compatible jobs (same size, steps, scheduler and guidance) that wait together ride in one
pipeline call, each with its own prompts and seeds, so each gets the images it would get alone.

A job is admitted (its admission callback: a Redis round trip) as it joins a batch, but on an
admission thread: the batch starts rendering at once, a job whose admission fails leaves it, and
a job's images are handed out only once it was admitted. So the GPU never waits on Redis.

Jobs reach the executor one by one (each task reserves its job in Redis and reads its inputs
first), so a burst would trickle into a small first batch and a ragged last one. A task announces
its job as it starts (`announce`); a batch being gathered waits, briefly, for announced jobs.
"""

import contextlib
import logging
import queue
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field, replace

import torch
from PIL.Image import Image

from worker.render_types import (
    BatchKey,
    PreviewCallback,
    RenderBatch,
    RenderedImages,
    StepCallback,
    batch_key,
)

log = logging.getLogger(__name__)

# (batch, on_step, on_preview). The executor passes `on_preview` only to a batch with items that
# ask for previews, so a render function that knows nothing of previews serves the others.
RenderFunction = Callable[
    [RenderBatch, StepCallback | None, PreviewCallback | None], RenderedImages
]
# A job's previews: (step, total steps, the previews of its own items, in item order).
JobPreviewCallback = Callable[[int, int, list[Image]], None]
# Runs before the first job; may return work to do later, whenever no job is waiting.
WarmUp = Callable[[], Iterable[Callable[[], object]] | None]


class RenderCanceled(Exception):
    """The job was canceled before or while it rendered."""


class NotAdmitted(Exception):
    """The job's admission callback refused it: it is no longer this worker's to render."""


class HandedBack(Exception):
    """The executor stopped taking jobs before this one was admitted to a batch."""


# How often a batch being gathered looks again for announced jobs.
_ARRIVAL_POLL_S = 0.002


class Arrival:
    """A job on its way to the executor: announced by its task as it starts, ended when the job
    is submitted or the task gives up on it (`end`, idempotent; or leave the `with` block)."""

    def __init__(self, executor: "GpuExecutor") -> None:
        self._executor = executor
        self._open = True

    def end(self) -> None:
        with self._executor._arrivals_lock:
            if self._open:
                self._open = False
                self._executor._arriving -= 1

    def __enter__(self) -> "Arrival":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.end()


class _BatchAbandoned(Exception):
    """Every job of the running batch is gone; raised from the step callback to stop the call."""


@dataclass(frozen=True)
class RenderJob:
    """One job's images, with how to report its progress and how to tell it was canceled.

    `on_admit` runs on the executor's admission thread when the job joins a batch, while the
    batch renders; it returns False when the job must not have its images after all.

    `on_preview` runs on the GPU thread, for a job still live, after a step at which its items
    (those that ask, `RenderItem.preview`) got previews. Previews are best effort: what it
    raises is logged and fails nothing. Keep it quick; the next step waits for it.
    """

    batch: RenderBatch
    on_step: StepCallback | None = None
    is_canceled: Callable[[], bool] = lambda: False
    on_admit: Callable[[], bool] | None = None
    on_preview: JobPreviewCallback | None = None


@dataclass(frozen=True)
class RenderOutcome:
    """A job's images and the pipeline call they came from."""

    images: list[Image]
    batch_id: str
    batch_images: int
    # The pipeline call alone, without the wait for a batch.
    render_s: float


@dataclass(eq=False)
class _Work:
    job: RenderJob
    key: BatchKey
    arrived: float = field(default_factory=time.monotonic)
    future: Future[RenderOutcome] = field(default_factory=Future)
    # Done once the job is admitted; its exception says why it was not.
    admission: Future[None] = field(default_factory=Future)

    @property
    def size(self) -> int:
        return len(self.job.batch.items)

    @property
    def pixels(self) -> int:
        return self.job.batch.pixels


def merge(jobs: list[RenderJob]) -> RenderBatch:
    """One batch holding every job's items in order; the jobs must share a batch key."""
    first = jobs[0].batch
    assert all(batch_key(job.batch) == batch_key(first) for job in jobs)
    return replace(first, items=tuple(item for job in jobs for item in job.batch.items))


class GpuExecutor:
    """Serialises GPU work on one thread, so the pipeline is never used concurrently, and
    groups compatible jobs into batches of at most `max_batch_images` images and
    `max_batch_pixels` pixels (a job larger than that renders alone).

    A batch waits `batch_wait_s` from its first job's arrival for company, and then, while
    announced jobs are still on their way, up to `arrival_wait_s` more; a lone job waits for
    nothing."""

    def __init__(
        self,
        render: RenderFunction,
        max_batch_images: int = 1,
        batch_wait_s: float = 0.0,
        key: Callable[[RenderBatch], BatchKey] = batch_key,
        stall_s: float = float("inf"),
        warm_up: WarmUp | None = None,
        max_batch_pixels: int | None = None,
        arrival_wait_s: float = 0.05,
    ) -> None:
        self._render = render
        self._key = key
        self._max_images = max_batch_images
        self._max_pixels = max_batch_pixels
        self._wait_s = batch_wait_s
        self._arrival_wait_s = arrival_wait_s
        # Jobs announced and not yet submitted (nor given up on).
        self._arriving = 0
        self._arrivals_lock = threading.Lock()
        self._stall_s = stall_s
        self._queue: queue.Queue[_Work | None] = queue.Queue()
        # Jobs that joined a batch, for the admission thread; None once shut down.
        self._to_admit: queue.Queue[_Work | None] = queue.Queue()
        # Jobs taken off the queue that did not fit the batch being gathered, oldest first.
        self._held: deque[_Work] = deque()
        # Jobs admitted in the current round of the loop, failed together if the loop breaks.
        self._in_hand: list[_Work] = []
        self._stopping = False
        self._handing_back = False
        self._admitting = threading.Event()
        self._admitting.set()
        # When the loop last showed life while busy; None while it waits for work.
        self._busy_since_beat: float | None = None
        # Done once `warm_up` has run on the executor's own thread: compiled code and CUDA graphs
        # belong to the thread that made them, so jobs must render on that same thread.
        self._ready: Future[None] = Future()
        # What the warm-up left for idle time, and whether it is all done.
        self._idle_work: deque[Callable[[], object]] = deque()
        self._fully_warm = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(warm_up,), name="gpu-executor", daemon=True
        )
        self._admitter = threading.Thread(
            target=self._admit_joined, name="gpu-admission", daemon=True
        )
        self._thread.start()
        self._admitter.start()

    def wait_ready(self, timeout: float | None = None) -> None:
        """Return once the warm-up is done; raise what it raised."""
        self._ready.result(timeout)

    def wait_fully_warm(self, timeout: float | None = None) -> bool:
        """Whether the warm-up work left for idle time was done within `timeout`."""
        return self._fully_warm.wait(timeout)

    def announce(self) -> Arrival:
        """Say a job is on its way, so the batch being gathered may wait for it."""
        with self._arrivals_lock:
            self._arriving += 1
        return Arrival(self)

    def submit(self, job: RenderJob, arrival: Arrival | None = None) -> Future[RenderOutcome]:
        """The job's images, or RenderCanceled, NotAdmitted, HandedBack, or whatever the render
        raised. The batch key is computed here, on the caller's thread, not the GPU's. The job's
        `arrival`, if it was announced, ends once the job is queued."""
        work = _Work(job, self._key(job.batch))
        try:
            if self._handing_back:
                work.future.set_exception(HandedBack())
                return work.future
            self._queue.put(work)
            return work.future
        finally:
            if arrival is not None:
                arrival.end()

    def shutdown(self) -> None:
        self._queue.put(None)
        self._admitting.set()
        self._thread.join()
        self._to_admit.put(None)
        self._admitter.join()

    def pause(self) -> None:
        """Admit no new batch until `resume`; the batch rendering now goes on."""
        self._admitting.clear()

    def resume(self) -> None:
        self._admitting.set()

    def stop_admitting(self) -> None:
        """Let the running batch finish; every job not yet admitted, and every one submitted
        from now on, fails with HandedBack."""
        self._handing_back = True
        self._admitting.set()

    def healthy(self) -> bool:
        """Both loops are alive and the GPU's, when busy, showed life within the stall deadline."""
        beat = self._busy_since_beat
        stalled = beat is not None and time.monotonic() - beat > self._stall_s
        return self._thread.is_alive() and self._admitter.is_alive() and not stalled

    def _show_life(self) -> None:
        self._busy_since_beat = time.monotonic()

    def _run(self, warm_up: WarmUp | None) -> None:
        try:
            if warm_up is not None:
                self._idle_work.extend(warm_up() or ())
        except BaseException as exc:
            self._ready.set_exception(exc)
            return
        self._ready.set_result(None)
        while True:
            self._in_hand = []
            try:
                first = self._next()
                if first is None:
                    return
                group = self._gather(first)
                if group:
                    self._render_group(group)
            except Exception as exc:
                # A bug in a round of the loop fails the jobs of that round, not the worker.
                log.exception("the GPU executor loop failed; failing the jobs it had admitted")
                for work in self._in_hand:
                    _settle(work, exc)

    def _next(self) -> _Work | None:
        """The oldest job not yet rendered, waiting for one; None once shut down and drained."""
        while True:
            self._busy_since_beat = None
            if self._held:
                work = self._held.popleft()
            elif self._stopping:
                return None
            else:
                item = self._take_queued()
                if item is None:
                    self._stopping = True
                    continue
                work = item
            self._admitting.wait()
            self._show_life()
            if self._admit(work):
                return work

    def _take_queued(self) -> _Work | None:
        """The next item on the queue, waiting for one; meanwhile, while none is there, the work
        the warm-up left for idle time runs, one piece at a time."""
        while self._idle_work:
            try:
                return self._queue.get_nowait()
            except queue.Empty:
                pass
            self._show_life()
            piece = self._idle_work.popleft()
            try:
                piece()
            except Exception:
                log.exception("a warm-up render in idle time failed; its shape warms on first use")
            self._busy_since_beat = None
        self._fully_warm.set()
        return self._queue.get()

    def _admit(self, work: _Work) -> bool:
        """Start the job unless it was canceled while it waited or the executor is handing its
        jobs back; its admission callback runs on the admission thread meanwhile."""
        if not work.future.set_running_or_notify_cancel():
            return False
        if self._handing_back:
            work.future.set_exception(HandedBack())
            return False
        if work.job.is_canceled():
            work.future.set_exception(RenderCanceled())
            return False
        if work.job.on_admit is None:
            work.admission.set_result(None)
        else:
            self._to_admit.put(work)
        self._in_hand.append(work)
        return True

    def _admit_joined(self) -> None:
        """The admission loop: each job's admission callback, in the order the jobs joined."""
        while True:
            work = self._to_admit.get()
            if work is None:
                return
            assert work.job.on_admit is not None
            try:
                admitted = work.job.on_admit()
            except Exception as exc:
                work.admission.set_exception(exc)
                continue
            if admitted:
                work.admission.set_result(None)
            else:
                work.admission.set_exception(NotAdmitted())

    def _gather(self, first: _Work) -> list[_Work]:
        """`first` and the compatible jobs that fit with it: those already waiting, then those
        that arrive within the batch wait counted from `first`'s arrival."""
        key = first.key
        group = [first]
        skipped: list[_Work] = []
        while self._held and not self._full(group):
            work = self._held.popleft()
            if work.key == key and self._fits(group, work):
                if self._admit(work):
                    group.append(work)
            else:
                skipped.append(work)
        self._held.extendleft(reversed(skipped))

        deadline = first.arrived + self._wait_s
        arrivals_until = max(deadline, time.monotonic()) + self._arrival_wait_s
        while not self._full(group) and not (self._stopping or self._handing_back):
            timeout = self._wait_for_next(deadline, arrivals_until)
            if timeout is None:
                break
            try:
                item = self._queue.get(timeout=timeout)
            except queue.Empty:
                continue
            if item is None:
                self._stopping = True
                break
            if item.key == key and self._fits(group, item):
                if self._admit(item):
                    group.append(item)
            else:
                self._held.append(item)
        return group

    def _wait_for_next(self, deadline: float, arrivals_until: float) -> float | None:
        """How long to wait for the next job: until the batch wait's deadline, then in short
        polls while announced jobs are on their way, until `arrivals_until`; None: no longer."""
        now = time.monotonic()
        if now < deadline:
            return deadline - now
        if self._arriving > 0 and now < arrivals_until:
            return min(arrivals_until - now, _ARRIVAL_POLL_S)
        if self._queue.empty():
            return None
        return 0.0

    def _fits(self, group: list[_Work], work: _Work) -> bool:
        """Whether `work` joins `group` within the caps on images and pixels."""
        if sum(member.size for member in group) + work.size > self._max_images:
            return False
        if self._max_pixels is None:
            return True
        return sum(member.pixels for member in group) + work.pixels <= self._max_pixels

    def _full(self, group: list[_Work]) -> bool:
        """No job of the group's shape could join it any more."""
        images = sum(member.size for member in group)
        if images >= self._max_images:
            return True
        if self._max_pixels is None:
            return False
        per_image = group[0].pixels // group[0].size
        return sum(member.pixels for member in group) + per_image > self._max_pixels

    def _render_group(self, group: list[_Work]) -> None:
        # Jobs already refused leave before the call; the others' admission goes on meanwhile.
        for work in [work for work in group if _refused(work) is not None]:
            group.remove(work)
            _settle(work)
        if not group:
            return
        batch_id = uuid.uuid4().hex[:16]
        batch = merge([work.job for work in group])
        live = list(group)
        started = time.monotonic()

        def finish(work: _Work, exc: BaseException) -> None:
            live.remove(work)
            _settle(work, exc)

        def on_step(step: int, total: int) -> None:
            self._show_life()
            for work in list(live):
                if _refused(work) is not None:
                    finish(work, NotAdmitted())
                    continue
                try:
                    if work.job.on_step is not None:
                        work.job.on_step(step, total)
                    canceled = step < total and work.job.is_canceled()
                except Exception as exc:
                    finish(work, exc)
                    continue
                if canceled:
                    finish(work, RenderCanceled())
            # Raising inside the step callback stops the pipeline at once, skipping the decode.
            if not live:
                raise _BatchAbandoned()

        offsets: dict[int, int] = {}
        offset = 0
        for work in group:
            offsets[id(work)] = offset
            offset += work.size

        def on_preview(step: int, total: int, previews: dict[int, Image]) -> None:
            for work in list(live):
                if work.job.on_preview is None or _refused(work) is not None:
                    continue
                start = offsets[id(work)]
                mine = [previews[i] for i in range(start, start + work.size) if i in previews]
                if not mine:
                    continue
                try:
                    work.job.on_preview(step, total, mine)
                except Exception:
                    log.debug("a job's preview callback failed at step %d", step, exc_info=True)

        wants_previews = any(item.preview is not None for item in batch.items) and any(
            work.job.on_preview is not None for work in group
        )
        out_of_memory = False
        try:
            if wants_previews:
                images = self._render(batch, on_step, on_preview)
            else:
                images = self._render(batch, on_step)  # type: ignore[call-arg]
            render_s = time.monotonic() - started
        except _BatchAbandoned:
            log.info("batch %s stopped: every job in it was canceled", batch_id)
            return
        except torch.OutOfMemoryError as exc:
            if len(live) <= 1:
                for work in list(live):
                    finish(work, _without_traceback(exc))
                return
            out_of_memory = True
        except BaseException as exc:
            log.exception("batch %s failed", batch_id)
            for work in list(live):
                finish(work, _without_traceback(exc))
            return
        if out_of_memory:
            # Out of memory: retried here, outside the except block, so the failed call's
            # tensors (held by its traceback) are freed before the smaller batches render.
            self._render_in_halves(batch_id, live)
            return

        log.info(
            "batch %s: %d jobs, %d images in %.3f s",
            batch_id,
            len(group),
            len(batch.items),
            render_s,
        )
        offset = 0
        for work in group:
            mine = images[offset : offset + work.size]
            offset += work.size
            if work not in live:
                continue
            failed = next((image for image in mine if isinstance(image, Exception)), None)
            if failed is not None:
                _settle(work, failed)
            else:
                _settle(work, RenderOutcome(mine, batch_id, len(batch.items), render_s))

    def _render_in_halves(self, batch_id: str, live: list[_Work]) -> None:
        half = len(live) // 2
        log.warning(
            "batch %s ran out of memory; rendering its %d jobs in two smaller batches",
            batch_id,
            len(live),
        )
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        self._render_group(live[:half])
        self._render_group(live[half:])


def _refused(work: _Work) -> BaseException | None:
    """Why the job was not admitted, once its admission answered that it was not."""
    return work.admission.exception() if work.admission.done() else None


def _settle(work: _Work, outcome: RenderOutcome | BaseException | None = None) -> None:
    """Hand the job its outcome once its admission answered (now, or later on the admission
    thread): a job that was not admitted gets why instead."""

    def settle(admission: Future[None]) -> None:
        refused = admission.exception()
        # A job may be settled twice (a loop that broke after handing out its outcome): the
        # first outcome stands.
        with contextlib.suppress(InvalidStateError):
            if refused is not None:
                work.future.set_exception(refused)
            elif isinstance(outcome, BaseException):
                work.future.set_exception(outcome)
            elif outcome is not None:
                work.future.set_result(outcome)

    work.admission.add_done_callback(settle)


def _without_traceback(exc: BaseException) -> BaseException:
    """The exception as the jobs get it: its traceback would keep the failed call's frames, and
    with them its device memory, alive until every job has dealt with the failure."""
    return exc.with_traceback(None)
