"""What happens to one job on a worker: claim, render, encode, upload, finish."""

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from shared.infotext import parameters_text
from shared.jobstore import JobStore, utc_now
from shared.schema import (
    CONTENT_TYPES,
    BatchInfo,
    JobError,
    JobErrorType,
    JobRecord,
    JobStatus,
    StoredImage,
    Timings,
)
from shared.storage import ObjectStorage, StorageError, image_key, job_prefix
from shared.webhooks import Webhooks
from worker.cancel import CancelWatcher
from worker.encoding import encode_image
from worker.executor import GpuExecutor, RenderCanceled, RenderJob
from worker.pipeline import NonFiniteImage, RenderBatch

log = logging.getLogger(__name__)

_MAX_ERROR_MESSAGE = 500


class RenderError(Exception):
    """The pipeline raised while rendering."""


class ProgressReporter:
    """Writes a running job's progress at most every `interval_s`, and always the last step."""

    def __init__(
        self, store: JobStore, webhooks: Webhooks, record: JobRecord, interval_s: float
    ) -> None:
        self._store = store
        self._webhooks = webhooks
        self._record = record
        self._interval_s = interval_s
        self._started = time.monotonic()
        self._last_write = float("-inf")

    def __call__(self, step: int, total: int) -> None:
        now = time.monotonic()
        if step < total and now - self._last_write < self._interval_s:
            return
        self._last_write = now
        eta_s = (now - self._started) / step * (total - step)
        written = self._store.update_progress(
            self._record.id, step=step, total=total, eta_s=round(eta_s, 3)
        )
        if written.applied:
            self._webhooks.enqueue(self._record, "progress")


@dataclass
class JobRunner:
    store: JobStore
    storage: ObjectStorage
    webhooks: Webhooks
    executor: GpuExecutor
    cancels: CancelWatcher
    worker_name: str
    # Whether a worker (by name) has sent a heartbeat lately.
    worker_alive: Callable[[str], bool]
    model_name: str
    key_prefix: str
    queue_timeout_s: float
    progress_interval_s: float

    def run(self, job_id: str) -> None:
        record = self.store.get(job_id)
        if record is None:
            log.info("skipping job %s: no such job (deleted after its retention?)", job_id)
            return
        waited_too_long = record.waited_longer_than(self.queue_timeout_s, utc_now())
        if record.status is JobStatus.QUEUED and waited_too_long:
            if self.store.expire(job_id):
                self.webhooks.job_event(record, JobStatus.EXPIRED)
            log.info("job %s expired in the queue", job_id)
            return
        started_at = utc_now()
        if record.status is JobStatus.RUNNING and self._orphaned(record):
            # Redelivered because the worker that had it died: take it over.
            if not self.store.reclaim(job_id, record.worker, self.worker_name, started_at):
                log.info("skipping job %s: another worker reclaimed it first", job_id)
                return
            log.warning("reclaimed job %s from dead worker %s", job_id, record.worker)
        else:
            claim = self.store.transition(
                job_id,
                JobStatus.RUNNING,
                expected=JobStatus.QUEUED,
                started_at=started_at,
                worker=self.worker_name,
            )
            if not claim.applied:
                state = claim.previous or "missing"
                log.info("skipping job %s: it is %s, not queued", job_id, state)
                return
        self.webhooks.job_event(record, JobStatus.RUNNING)
        self.cancels.watch(job_id)
        try:
            self._render_and_store(record, started_at.timestamp())
        except RenderCanceled:
            log.info("job %s was canceled while it rendered", job_id)
        except Exception as exc:
            self._fail(record, exc)
            raise
        finally:
            self.cancels.unwatch(job_id)

    def _orphaned(self, record: JobRecord) -> bool:
        return record.worker is None or not self.worker_alive(record.worker)

    def _canceled(self, job_id: str) -> bool:
        return self.store.status(job_id) is JobStatus.CANCELED

    def _render_and_store(self, record: JobRecord, started: float) -> None:
        request = record.request
        render_started = time.monotonic()
        job = RenderJob(
            RenderBatch.from_request(request),
            on_step=ProgressReporter(self.store, self.webhooks, record, self.progress_interval_s),
            # Checked between denoising steps: an in-memory lookup, no Redis round trip.
            is_canceled=lambda: self.cancels.is_canceled(record.id),
        )
        try:
            outcome = self.executor.submit(job).result()
        except (RenderCanceled, torch.OutOfMemoryError, NonFiniteImage):
            raise
        except Exception as exc:
            raise RenderError(str(exc)) from exc
        render_s = time.monotonic() - render_started
        if self._canceled(record.id):
            raise RenderCanceled()
        images = outcome.images

        upload_started = time.monotonic()
        stored: list[StoredImage] = []
        extension = request.output_format
        for index, (image, seed) in enumerate(zip(images, request.image_seeds(), strict=True)):
            key = image_key(self.key_prefix, record.id, index, extension)
            data = encode_image(image, extension, parameters_text(request, seed, self.model_name))
            self.storage.put(key, data, CONTENT_TYPES[extension])
            stored.append(
                StoredImage(
                    key=key,
                    width=image.width,
                    height=image.height,
                    seed=seed,
                    content_type=CONTENT_TYPES[extension],
                )
            )
        upload_s = time.monotonic() - upload_started
        timings = Timings(
            queued_s=round(started - record.created_at.timestamp(), 4),
            render_s=round(render_s, 4),
            upload_s=round(upload_s, 4),
        )
        finished = self.store.transition(
            record.id,
            JobStatus.SUCCEEDED,
            expected=JobStatus.RUNNING,
            images=stored,
            timings=timings,
            batch=BatchInfo(id=outcome.batch_id, images=outcome.batch_images),
            finished_at=utc_now(),
        )
        if not finished.applied:
            # Canceled during the upload: the job ends with no objects.
            self.storage.delete_prefix(job_prefix(self.key_prefix, record.id))
            raise RenderCanceled()
        self.store.record_completion(render_s + upload_s, time.time())
        self.webhooks.job_event(record, JobStatus.SUCCEEDED)

    def _fail(self, record: JobRecord, exc: Exception) -> None:
        error = JobError(type=_error_type(exc), message=str(exc)[:_MAX_ERROR_MESSAGE] or repr(exc))
        failed = self.store.transition(
            record.id,
            JobStatus.FAILED,
            expected=JobStatus.RUNNING,
            error=error,
            finished_at=utc_now(),
        )
        if failed.applied:
            self.webhooks.job_event(record, JobStatus.FAILED)
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
