"""What happens to one job on a worker: reserve, admit, render, encode, upload, finish.

A job is reserved (still `queued`) when its message arrives, `running` once the GPU executor
admits it to a batch, and every write of this attempt is fenced on (worker, attempt): a worker
that lost the job (its lease lapsed, or it was canceled) cannot change it any more.
"""

import io
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from typing import Any, Protocol

import torch
from PIL import Image as PILImage
from PIL.Image import Image
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from shared.infotext import parameters_text
from shared.jobstore import CasResult, Holder, JobStore, RequeueReason, Reservation
from shared.metrics import count_finished
from shared.queue import SendRender
from shared.records import utc_now
from shared.schema import (
    CONTENT_TYPES,
    BatchInfo,
    JobError,
    JobErrorType,
    JobRecord,
    JobStatus,
    Progress,
    SafetyAction,
    StoredImage,
    Timings,
)
from shared.storage import StorageError, attempt_prefix, image_key, input_key
from shared.webhooks import Webhooks
from worker import metrics
from worker.cancel import CancelWatcher
from worker.controlnet import control_map
from worker.encoding import encode_image
from worker.executor import (
    Arrival,
    GpuExecutor,
    HandedBack,
    NotAdmitted,
    RenderCanceled,
    RenderJob,
    RenderOutcome,
)
from worker.leases import LeaseKeeper
from worker.previews import PreviewWriter
from worker.provenance import Marker
from worker.render_types import NonFiniteImage, RenderBatch
from worker.reporter import Reporter
from worker.safety import SafetyChecker, Verdict, apply_action
from worker.uploads import StorageGuard

log = logging.getLogger(__name__)

_MAX_ERROR_MESSAGE = 500
_END_WRITE_RETRY_DELAY_S = 0.25
# Admission rides out a Redis blip (a restart, a failover, a pause) for this long, with backoff;
# after that the job is handed back rather than left to lapse as if its worker were lost.
_ADMISSION_RETRY_S = 4.0
_ADMISSION_FIRST_DELAY_S = 0.1
_ADMISSION_MAX_DELAY_S = 1.0


class FaultHooks(Protocol):
    """Development-only fault injection (worker/faults.py), where the settings turn it on."""

    def on_admission(self, prompt: str) -> None: ...

    def on_progress_write(self, prompt: str) -> None: ...


class RenderError(Exception):
    """The pipeline raised while rendering."""


class AdmissionError(Exception):
    """Admitting the job to a batch failed for a reason other than Redis being unreachable."""


class AdmissionUnreachable(Exception):
    """Redis could not be reached to admit the job, even after retrying for a while."""


class WorkerStopping(Exception):
    """The worker is stopping: the message goes back to the broker untouched."""


@dataclass
class _Attempt:
    """One attempt of a job on this worker."""

    record: JobRecord
    holder: Holder
    arrival: Arrival | None = None
    started_at: datetime | None = None

    @property
    def job_id(self) -> str:
        return self.record.id


class ProgressWriter:
    """Called on the GPU thread after each step: posts the job's progress to the reporter at
    most every `interval_s` (and always the last step). It never touches Redis itself."""

    def __init__(
        self,
        reporter: Reporter,
        key: str,
        write: Callable[[int, int, float], None],
        interval_s: float,
    ) -> None:
        self._reporter = reporter
        self._key = key
        self._write = write
        self._interval_s = interval_s
        self._started = time.monotonic()
        self._last_post = float("-inf")

    def __call__(self, step: int, total: int) -> None:
        now = time.monotonic()
        if step < total and now - self._last_post < self._interval_s:
            return
        self._last_post = now
        eta_s = round((now - self._started) / step * (total - step), 3)
        self._reporter.post(self._key, lambda: self._write(step, total, eta_s))


@dataclass
class JobRunner:
    store: JobStore
    uploads: StorageGuard
    webhooks: Webhooks
    executor: GpuExecutor
    cancels: CancelWatcher
    leases: LeaseKeeper
    reporter: Reporter
    send_render: SendRender
    model_name: str
    # The broker queue this worker reads (its model's).
    queue: str
    # None only where the operator turned the checker off.
    safety: SafetyChecker | None
    key_prefix: str
    queue_timeout_s: float
    progress_interval_s: float
    faults: FaultHooks | None
    marker: Marker
    png_compress_level: int = 1
    stopping: bool = False

    def run(self, job_id: str, attempt: int | None) -> None:
        """Render one attempt of a job, unless the message is stale or a duplicate; raises
        WorkerStopping for a message that arrives once the worker is stopping."""
        if self.stopping:
            raise WorkerStopping()
        # Announced before the Redis round trips and input reads that precede the render, so a
        # burst's jobs reach the GPU as one batch rather than trickling in.
        with self.executor.announce() as arrival:
            self._run(job_id, attempt, arrival)

    def _run(self, job_id: str, attempt: int | None, arrival: Arrival) -> None:
        record = self.store.get(job_id)
        if record is None:
            log.info("skipping job %s: no such job (deleted after its retention?)", job_id)
            return
        waited_too_long = record.waited_longer_than(self.queue_timeout_s, utc_now())
        if record.status is JobStatus.QUEUED and waited_too_long:
            if self.store.expire(job_id):
                count_finished(JobStatus.EXPIRED)
                self.webhooks.job_event(record, JobStatus.EXPIRED)
            log.info("job %s expired in the queue", job_id)
            return
        attempt = record.attempt if attempt is None else attempt
        reservation = self.store.reserve(
            job_id, attempt, self.leases.worker_name, self.leases.lease_s, self.queue
        )
        if reservation is not Reservation.RESERVED:
            log.info(
                "dropping the message of job %s attempt %d: %s", job_id, attempt, reservation.value
            )
            return
        current = _Attempt(record, self.leases.hold(job_id, attempt), arrival)
        self.cancels.watch(job_id)
        try:
            self._render_and_store(current)
        except (RenderCanceled, NotAdmitted):
            log.info("job %s attempt %d ended here: canceled or no longer ours", job_id, attempt)
        except HandedBack:
            self._hand_back(job_id, current.holder)
        except AdmissionUnreachable as exc:
            log.warning(
                "could not admit job %s attempt %d, handing it back: %s", job_id, attempt, exc
            )
            # Retried for as long as the lease would last (it is renewed meanwhile): a blip is
            # not a lost worker, and costs the job no retry.
            self._hand_back(job_id, current.holder, retry_s=self.leases.lease_s)
        except RedisError as exc:
            # Its lease lapses and the reaper starts a new attempt.
            log.warning("lost Redis during job %s attempt %d: %s", job_id, attempt, exc)
        except Exception as exc:
            self._fail(current, exc)
            raise
        finally:
            self.cancels.unwatch(job_id)
            self.leases.release(job_id)

    def _admit(self, current: _Attempt) -> bool:
        """On the executor's admission thread, as the job reaches the executor: from now on it
        is `running`. Retried while Redis is unreachable; raises AdmissionUnreachable when it
        stays so."""
        record, started_at = current.record, utc_now()
        give_up_at = time.monotonic() + _ADMISSION_RETRY_S
        delay = _ADMISSION_FIRST_DELAY_S
        retried = False
        while True:
            try:
                if self.faults is not None:
                    self.faults.on_admission(record.request.prompt)
                result = self.store.admit(record.id, current.holder, started_at)
            except (RedisConnectionError, RedisTimeoutError) as exc:
                if time.monotonic() + delay > give_up_at:
                    raise AdmissionUnreachable(str(exc)) from exc
                log.warning("could not admit job %s (%s); retrying", record.id, exc)
                retried = True
                time.sleep(delay)
                delay = min(2 * delay, _ADMISSION_MAX_DELAY_S)
                continue
            except RedisError as exc:
                log.warning("could not admit job %s: %s", record.id, exc)
                return False
            except Exception as exc:
                raise AdmissionError(str(exc)) from exc
            break
        admitted = result.applied
        if retried and not admitted and result.previous is JobStatus.RUNNING:
            # The write before the blip may have landed with only its answer lost.
            try:
                admitted = self._holds(record.id, current.holder)
            except RedisError as exc:
                raise AdmissionUnreachable(str(exc)) from exc
        if admitted:
            current.started_at = started_at
            metrics.job_started(record.created_at, started_at)
            self.reporter.post(
                f"{record.id}:started", lambda: self.webhooks.job_event(record, JobStatus.RUNNING)
            )
        return admitted

    def _holds(self, job_id: str, holder: Holder) -> bool:
        record = self.store.get(job_id)
        return record is not None and (record.worker, record.attempt) == (
            holder.worker,
            holder.attempt,
        )

    def _write_progress(self, current: _Attempt, step: int, total: int, eta_s: float) -> None:
        record = current.record
        if self.faults is not None:
            self.faults.on_progress_write(record.request.prompt)
        written = self.store.update_progress(
            record.id, current.holder, step=step, total=total, eta_s=eta_s
        )
        if written.applied:
            self.webhooks.enqueue(record, "progress")

    def _no_longer_ours(self, job_id: str) -> bool:
        # In memory: checked between denoising steps, without a Redis round trip.
        return self.cancels.is_canceled(job_id) or self.leases.is_lost(job_id)

    def _input_image(self, job_id: str, name: str) -> Image:
        data = self.uploads.storage.get(input_key(self.key_prefix, job_id, name))
        return PILImage.open(io.BytesIO(data))

    def _batch(self, record: JobRecord) -> RenderBatch:
        """The job's batch, with its input images read (and a control map computed) here, on
        the task's thread, not the GPU's."""
        request = record.request
        if request.control is not None:
            picture = self._input_image(record.id, "control")
            control = control_map(picture, request.control.type, request.control.preprocess)
            return RenderBatch.from_request(request, control_image=control)
        if request.init_image is None:
            return RenderBatch.from_request(request)
        init = self._input_image(record.id, "init")
        mask = self._input_image(record.id, "mask") if request.mask_image is not None else None
        return RenderBatch.from_request(request, init, mask)

    def _check_safety(self, images: list[Image], action: SafetyAction) -> list[Verdict]:
        flags: list[bool | None] = (
            list(self.safety.flagged(images)) if self.safety else [None] * len(images)
        )
        verdicts = [
            apply_action(image, flagged, action)
            for image, flagged in zip(images, flags, strict=True)
        ]
        for verdict in verdicts:
            outcome = verdict.safety.action if verdict.safety.flagged else "passed"
            if verdict.safety.checked:
                metrics.SAFETY_CHECKED_IMAGES.labels(outcome=outcome).inc()
        return verdicts

    def _render(self, current: _Attempt) -> RenderOutcome:
        job = RenderJob(
            self._batch(current.record),
            on_step=ProgressWriter(
                self.reporter,
                f"{current.job_id}:progress",
                lambda step, total, eta_s: self._write_progress(current, step, total, eta_s),
                self.progress_interval_s,
            ),
            is_canceled=lambda: self._no_longer_ours(current.job_id),
            on_admit=lambda: self._admit(current),
            on_preview=self._previews(current),
        )
        try:
            return self.executor.submit(job, current.arrival).result()
        except (
            RenderCanceled,
            NotAdmitted,
            HandedBack,
            AdmissionError,
            AdmissionUnreachable,
            torch.OutOfMemoryError,
            NonFiniteImage,
        ):
            raise
        except Exception as exc:
            raise RenderError(str(exc)) from exc

    def _previews(self, current: _Attempt) -> PreviewWriter | None:
        spec = current.record.request.preview
        if spec is None:
            return None
        return PreviewWriter(
            self.reporter,
            f"{current.job_id}:preview",
            spec,
            lambda preview: self.store.write_preview(current.job_id, current.holder, preview),
        )

    def _render_and_store(self, current: _Attempt) -> None:
        record, holder, request = current.record, current.holder, current.record.request
        outcome = self._render(current)
        log.info(
            "rendered job %s attempt %d in batch %s", record.id, holder.attempt, outcome.batch_id
        )
        if self._no_longer_ours(record.id) or current.started_at is None:
            raise RenderCanceled()

        upload_started = time.monotonic()
        stored: list[StoredImage] = []
        extension = request.output_format
        verdicts = self._check_safety(outcome.images, request.safety_action or "block")
        images = zip(outcome.images, verdicts, request.image_seeds(), strict=True)
        for index, (image, verdict, seed) in enumerate(images):
            key = provenance = None
            if verdict.image is not None:
                key = image_key(self.key_prefix, record.id, holder.attempt, index, extension)
                parameters = parameters_text(request, seed, self.model_name, verdict.safety)
                encode = partial(
                    encode_image,
                    output_format=extension,
                    parameters=parameters,
                    png_compress_level=self.png_compress_level,
                )
                data, provenance = self.marker.mark(
                    verdict.image, record, index, CONTENT_TYPES[extension], encode
                )
                self.uploads.put(key, data, CONTENT_TYPES[extension])
            stored.append(
                StoredImage(
                    key=key,
                    width=image.width,
                    height=image.height,
                    seed=seed,
                    content_type=CONTENT_TYPES[extension],
                    safety=verdict.safety,
                    provenance=provenance,
                )
            )
        if any(image.provenance and image.provenance.watermark for image in stored):
            self._remember_watermark(record.id)
        upload_s = time.monotonic() - upload_started
        timings = Timings(
            queued_s=round((current.started_at - record.created_at).total_seconds(), 4),
            render_s=round(outcome.render_s, 4),
            upload_s=round(upload_s, 4),
        )
        steps = request.num_inference_steps
        finished = self._record_end(
            current,
            JobStatus.SUCCEEDED,
            expected=JobStatus.RUNNING,
            images=stored,
            timings=timings,
            batch=BatchInfo(id=outcome.batch_id, images=outcome.batch_images),
            # Progress writes are best effort; the finished job always shows the last step.
            progress=Progress(step=steps, total=steps, eta_s=0.0),
            finished_at=utc_now(),
        )
        if not finished.applied:
            # Canceled during the upload, or no longer this worker's: leave no objects behind.
            self._delete_attempt(current)
            raise RenderCanceled()
        metrics.job_succeeded(timings)
        log.info(
            "job %s attempt %d succeeded: %d images, render %.3f s, upload %.3f s, batch %s",
            record.id,
            holder.attempt,
            len(stored),
            outcome.render_s,
            upload_s,
            outcome.batch_id,
        )
        self._after_finish(record, JobStatus.SUCCEEDED, outcome.render_s + upload_s)

    def _remember_watermark(self, job_id: str) -> None:
        """Let `POST /v1/provenance/verify` find this job from its images' watermark."""
        try:
            self.store.remember_watermark(job_id)
        except RedisError as exc:
            # The images stay marked; verify then says only that this service made them.
            log.warning("could not index job %s by its watermark: %s", job_id, exc)

    def _record_end(
        self, current: _Attempt, status: JobStatus, expected: JobStatus | None = None, **fields: Any
    ) -> CasResult:
        """Write how the attempt ended, retrying while Redis is unreachable (a restart, a
        failover) or no replica confirms the end (`redisconn.end_wait_args`) for as long as the
        lease would last: a finished render is not redone, nor its end undone by a failover,
        because its end could not be written for a moment."""
        give_up_at = time.monotonic() + self.leases.lease_s
        retried = False
        while True:
            try:
                result = self.store.transition(
                    current.job_id, status, expected=expected, holder=current.holder, **fields
                )
                if retried and not result.applied and result.previous is status:
                    # The write before landed and only its answer, or its replica's, was lost.
                    confirmed = self.store.confirm_end(current.job_id, status, current.holder)
                    if confirmed is not None:
                        result = CasResult(True, expected, confirmed.replicated)
            except (RedisConnectionError, RedisTimeoutError) as exc:
                if time.monotonic() >= give_up_at:
                    raise
                log.warning(
                    "could not record that job %s %s (%s); retrying",
                    current.job_id,
                    status.value,
                    exc,
                )
                retried = True
                time.sleep(_END_WRITE_RETRY_DELAY_S)
                continue
            if result.applied and not result.replicated and time.monotonic() < give_up_at:
                log.warning(
                    "no replica confirmed that job %s %s yet; writing it again",
                    current.job_id,
                    status.value,
                )
                retried = True
                time.sleep(_END_WRITE_RETRY_DELAY_S)
                continue
            return result

    def _after_finish(self, record: JobRecord, status: JobStatus, job_s: float | None) -> None:
        """Throughput figures and the webhook: the job has ended whether or not these work."""
        try:
            if job_s is not None:
                self.store.record_completion(job_s)
            self.webhooks.job_event(record, status)
        except Exception as exc:
            log.warning("bookkeeping after job %s ended failed: %s", record.id, exc)

    def _delete_attempt(self, current: _Attempt) -> None:
        attempt = current.holder.attempt
        try:
            self.uploads.storage.delete_prefix(
                attempt_prefix(self.key_prefix, current.job_id, attempt)
            )
        except StorageError as exc:
            log.warning("could not delete attempt %d of job %s: %s", attempt, current.job_id, exc)

    def hand_back_held(self) -> None:
        """Give back every job this worker holds, rendering or not (a stop past its grace)."""
        for job_id, holder in self.leases.held().items():
            self._hand_back(job_id, holder)

    def _hand_back(self, job_id: str, holder: Holder, retry_s: float = 0.0) -> None:
        """A stopping worker gives a job back to the queue as a new attempt; while Redis is
        unreachable it tries again for up to `retry_s`."""
        give_up_at = time.monotonic() + retry_s
        try:
            while True:
                try:
                    requeued = self.store.requeue(
                        job_id,
                        RequeueReason.HANDED_BACK,
                        max_retries=0,
                        worker=holder.worker,
                    )
                    break
                except (RedisConnectionError, RedisTimeoutError):
                    if time.monotonic() >= give_up_at:
                        raise
                    time.sleep(_END_WRITE_RETRY_DELAY_S)
            if not requeued.requeued or requeued.attempt is None:
                return
            log.info("handed back job %s as attempt %d", job_id, requeued.attempt)
            if not requeued.sent:
                self.send_render(job_id, requeued.attempt)
        except Exception as exc:
            # Its lease lapses, or the reaper sends the unreserved job again.
            log.warning("could not hand back job %s: %s", job_id, exc)

    def _fail(self, current: _Attempt, exc: Exception) -> None:
        record = current.record
        error = JobError(type=_error_type(exc), message=str(exc)[:_MAX_ERROR_MESSAGE] or repr(exc))
        try:
            failed = self._record_end(current, JobStatus.FAILED, error=error, finished_at=utc_now())
        except RedisError as redis_error:
            log.warning("could not record that job %s failed: %s", record.id, redis_error)
            return
        if failed.applied:
            count_finished(JobStatus.FAILED)
            self._after_finish(record, JobStatus.FAILED, None)
        self._delete_attempt(current)
        log.error("job %s failed: %s: %s", record.id, error.type, error.message)


def _error_type(exc: Exception) -> JobErrorType:
    if isinstance(exc, torch.OutOfMemoryError):
        return JobErrorType.OUT_OF_MEMORY
    if isinstance(exc, NonFiniteImage):
        return JobErrorType.NUMERICAL_ERROR
    if isinstance(exc, RenderError):
        return JobErrorType.RENDER_ERROR
    if isinstance(exc, StorageError):
        return JobErrorType.STORAGE_ERROR
    return JobErrorType.INTERNAL_ERROR
