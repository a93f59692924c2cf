"""Submit and read jobs."""

import logging
import secrets

from fastapi import APIRouter, Request, Response, status

from api.deps import Services, ServicesDep
from shared.errors import ErrorEnvelope, ErrorType, ServiceError
from shared.jobstore import new_job_id, utc_now
from shared.queue import RENDER_TASK
from shared.schema import (
    MAX_SEED,
    GenerationRequest,
    ImageOut,
    JobError,
    JobErrorType,
    JobOut,
    JobRecord,
    JobStatus,
)

log = logging.getLogger(__name__)

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

_ERRORS = {
    status.HTTP_404_NOT_FOUND: {"model": ErrorEnvelope},
    status.HTTP_422_UNPROCESSABLE_CONTENT: {"model": ErrorEnvelope},
    status.HTTP_503_SERVICE_UNAVAILABLE: {"model": ErrorEnvelope},
}


def job_out(record: JobRecord, services: Services, request: Request) -> JobOut:
    base_url = services.base_url(request)
    images = [
        ImageOut(
            url=services.storage.download_url(image.key, base_url),
            width=image.width,
            height=image.height,
            seed=image.seed,
            content_type=image.content_type,
        )
        for image in record.images
    ]
    return JobOut(**record.model_dump(exclude={"images"}), images=images)


def _check_pixel_budget(generation: GenerationRequest, limit: int) -> None:
    if generation.pixels > limit:
        raise ServiceError(
            ErrorType.VALIDATION_ERROR,
            f"width x height x num_images is {generation.pixels}, over the limit of {limit}",
            [{"loc": ["body"], "msg": "pixel budget exceeded", "type": "pixel_budget"}],
        )


@router.post(
    "",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=JobOut,
    responses=_ERRORS,
    summary="Submit a generation job",
)
def create_job(
    generation: GenerationRequest, services: ServicesDep, request: Request, response: Response
) -> JobOut:
    _check_pixel_budget(generation, services.api.max_pixels_per_job)
    if generation.seed is None:
        generation = generation.model_copy(update={"seed": secrets.randbelow(MAX_SEED + 1)})
    record = JobRecord(
        id=new_job_id(), status=JobStatus.QUEUED, created_at=utc_now(), request=generation
    )
    services.store.create(record)
    try:
        services.celery.send_task(
            RENDER_TASK,
            kwargs={"job_id": record.id},
            queue=services.core.queue_name,
            retry_policy={"max_retries": 2, "interval_start": 0, "interval_step": 0.2},
        )
    except Exception as exc:
        log.warning("could not enqueue job %s: %s", record.id, exc)
        services.store.transition(
            record.id,
            JobStatus.FAILED,
            error=JobError(type=JobErrorType.INTERNAL_ERROR, message="the job was not enqueued"),
            finished_at=utc_now(),
        )
        raise ServiceError(
            ErrorType.UNAVAILABLE, "the queue is unavailable; retry shortly"
        ) from exc
    response.headers["Location"] = f"/v1/jobs/{record.id}"
    return job_out(record, services, request)


@router.get("/{job_id}", response_model=JobOut, responses=_ERRORS, summary="Read a job")
def get_job(job_id: str, services: ServicesDep, request: Request) -> JobOut:
    record = services.store.get(job_id)
    if record is None:
        raise ServiceError(ErrorType.NOT_FOUND, f"no job with id {job_id!r}")
    return job_out(record, services, request)
