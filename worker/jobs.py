"""What happens to one job on a worker: claim, render, encode, upload, finish."""

import logging
import time
from dataclasses import dataclass

import torch

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
from shared.storage import ObjectStorage, StorageError, image_key
from worker.encoding import encode_image, parameters_text
from worker.executor import GpuExecutor, RenderJob
from worker.pipeline import RenderBatch

log = logging.getLogger(__name__)

_MAX_ERROR_MESSAGE = 500


class RenderError(Exception):
    """The pipeline raised while rendering."""


@dataclass
class JobRunner:
    store: JobStore
    storage: ObjectStorage
    executor: GpuExecutor
    model_name: str
    key_prefix: str

    def run(self, job_id: str) -> None:
        started_at = utc_now()
        claim = self.store.transition(
            job_id, JobStatus.RUNNING, expected=JobStatus.QUEUED, started_at=started_at
        )
        if not claim.applied:
            log.info("skipping job %s: it is %s, not queued", job_id, claim.previous or "missing")
            return
        record = self.store.get(job_id)
        if record is None:
            log.warning("job %s vanished after it was claimed", job_id)
            return
        try:
            self._render_and_store(record, started_at.timestamp())
        except Exception as exc:
            self._fail(job_id, exc)
            raise

    def _render_and_store(self, record: JobRecord, started: float) -> None:
        request = record.request
        render_started = time.monotonic()
        try:
            outcome = self.executor.submit(RenderJob(RenderBatch.from_request(request))).result()
        except torch.OutOfMemoryError:
            raise
        except Exception as exc:
            raise RenderError(str(exc)) from exc
        render_s = time.monotonic() - render_started
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
        timings = Timings(
            queued_s=round(started - record.created_at.timestamp(), 4),
            render_s=round(render_s, 4),
            upload_s=round(time.monotonic() - upload_started, 4),
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
            log.info(
                "job %s ended %s while rendering; result dropped", record.id, finished.previous
            )

    def _fail(self, job_id: str, exc: Exception) -> None:
        error = JobError(type=_error_type(exc), message=str(exc)[:_MAX_ERROR_MESSAGE] or repr(exc))
        self.store.transition(
            job_id, JobStatus.FAILED, expected=JobStatus.RUNNING, error=error, finished_at=utc_now()
        )
        log.error("job %s failed: %s: %s", job_id, error.type, error.message)


def _error_type(exc: Exception) -> JobErrorType:
    if isinstance(exc, torch.OutOfMemoryError):
        return JobErrorType.OUT_OF_MEMORY
    if isinstance(exc, RenderError):
        return JobErrorType.RENDER_ERROR
    if isinstance(exc, StorageError):
        return JobErrorType.STORAGE_ERROR
    return JobErrorType.INTERNAL_ERROR
