"""Submit, read, list and cancel jobs."""

import logging
import math
import re
import secrets
import time
from typing import Annotated

from fastapi import APIRouter, Header, Query, Request, status
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from api.deps import CallerDep, Services, ServicesDep
from api.events import wait_until_terminal
from api.jobview import job_out
from api.metrics import JOBS_SUBMITTED
from api.ratelimit import Decision
from shared.apikeys import ApiKey
from shared.errors import ErrorEnvelope, ErrorType, ServiceError
from shared.jobstore import QueueFull, new_job_id, request_fingerprint, utc_now
from shared.metrics import count_finished
from shared.queue import send_render
from shared.schema import (
    MAX_SEED,
    GenerationRequest,
    JobList,
    JobOut,
    JobRecord,
    JobStatus,
)
from shared.webhooks import WebhookRefused, check_webhook_url

log = logging.getLogger(__name__)

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

MAX_WAIT_S = 60
_PREFER_WAIT = re.compile(r"(?:^|[,;\s])wait\s*=\s*(\d+)", re.IGNORECASE)
_IDEMPOTENCY_KEY = re.compile(r"^[\x21-\x7e]{1,255}$")


def _errors(*codes: int) -> dict[int | str, dict]:
    return {code: {"model": ErrorEnvelope} for code in codes}


def _check_pixel_budget(generation: GenerationRequest, limit: int) -> None:
    if generation.pixels > limit:
        raise ServiceError(
            ErrorType.VALIDATION_ERROR,
            f"width x height x num_images is {generation.pixels}, over the limit of {limit}",
            [{"loc": ["body"], "msg": "pixel budget exceeded", "type": "pixel_budget"}],
        )


def _check_webhook(generation: GenerationRequest, services: Services) -> None:
    if generation.webhook is None:
        return
    try:
        check_webhook_url(generation.webhook.url, services.webhook_settings)
    except WebhookRefused as exc:
        raise ServiceError(
            ErrorType.VALIDATION_ERROR,
            f"the webhook URL is refused: {exc}",
            [{"loc": ["body", "webhook", "url"], "msg": str(exc), "type": "webhook_refused"}],
        ) from exc


def _rate_limited(decision: Decision) -> ServiceError:
    return ServiceError(
        ErrorType.RATE_LIMITED,
        f"over this key's limit of {decision.limit} jobs per minute",
        headers=decision.headers(),
    )


def _queue_full(services: Services, depth: int, decision: Decision) -> ServiceError:
    retry_after = 5
    rate, _ = services.store.throughput(time.time())
    if rate:
        retry_after = max(1, math.ceil(1 / rate))
    return ServiceError(
        ErrorType.OVERLOADED,
        f"the queue is full ({depth} jobs); retry later",
        headers={**decision.headers(), "Retry-After": str(retry_after)},
    )


def _requested_wait_s(prefer: str | None) -> int:
    match = _PREFER_WAIT.search(prefer or "")
    return min(int(match.group(1)), MAX_WAIT_S) if match else 0


def _enqueue(
    services: Services, caller: ApiKey, generation: GenerationRequest, idempotency_key: str | None
) -> tuple[JobRecord, bool]:
    """Create the job (or find the one this idempotency key made) and send it to the workers."""
    resolved = generation
    if generation.seed is None:
        resolved = generation.model_copy(update={"seed": secrets.randbelow(MAX_SEED + 1)})
    record = JobRecord(
        id=new_job_id(),
        owner=caller.id,
        status=JobStatus.QUEUED,
        created_at=utc_now(),
        request=resolved,
    )
    # The fingerprint is of the body as sent, so a retry without a seed matches its original.
    fingerprint = request_fingerprint(generation)
    created = services.store.create(
        record, idempotency_key, fingerprint, services.api.max_queue_depth
    )
    if not created.created:
        if created.fingerprint != fingerprint:
            raise ServiceError(
                ErrorType.CONFLICT,
                "this Idempotency-Key was used with a different request body",
                {"job_id": created.job_id},
            )
        earlier = services.store.get(created.job_id)
        if earlier is None:
            # The earlier job is past its retention; the key no longer protects anything.
            assert idempotency_key is not None
            services.store.forget_idempotency_key(caller.id, idempotency_key)
            return _enqueue(services, caller, generation, idempotency_key)
        return earlier, False
    try:
        send_render(services.celery, services.core.queue_name, record.id, record.attempt)
    except Exception as exc:
        # The job is stored: the reaper sends an unreserved job whose message never came.
        log.warning("could not send job %s yet: %s", record.id, exc, extra={"job_id": record.id})
    JOBS_SUBMITTED.inc()
    log.info("job %s queued", record.id, extra={"job_id": record.id})
    return record, True


@router.post(
    "",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=JobOut,
    responses={
        200: {"model": JobOut, "description": "finished within `Prefer: wait`, or a replay"},
        **_errors(401, 409, 413, 422, 429, 503),
    },
    summary="Submit a generation job",
)
async def create_job(
    generation: GenerationRequest,
    services: ServicesDep,
    caller: CallerDep,
    request: Request,
    idempotency_key: Annotated[
        str | None,
        Header(description="retrying with the same key and body returns the same job (24 h)"),
    ] = None,
    prefer: Annotated[
        str | None, Header(description="`wait=N` holds the answer up to N s (at most 60)")
    ] = None,
) -> JSONResponse:
    _check_pixel_budget(generation, services.api.max_pixels_per_job)
    if idempotency_key is not None and not _IDEMPOTENCY_KEY.match(idempotency_key):
        raise ServiceError(
            ErrorType.VALIDATION_ERROR, "Idempotency-Key must be 1-255 visible ASCII characters"
        )
    await run_in_threadpool(_check_webhook, generation, services)
    decision = await run_in_threadpool(
        services.rate_limiter.take, caller.id, caller.rate_limit_per_min
    )
    if not decision.allowed:
        raise _rate_limited(decision)
    try:
        record, created = await run_in_threadpool(
            _enqueue, services, caller, generation, idempotency_key
        )
    except QueueFull as full:
        raise _queue_full(services, full.depth, decision) from full
    headers = {"Location": f"/v1/jobs/{record.id}", **decision.headers()}
    wait_s = _requested_wait_s(prefer)
    if wait_s:
        headers["Preference-Applied"] = f"wait={wait_s}"
        await wait_until_terminal(services, record.id, wait_s)
    if not created:
        headers["Idempotent-Replayed"] = "true"
    latest = await run_in_threadpool(services.store.get, record.id) or record
    body = await run_in_threadpool(job_out, latest, services, services.base_url(request))
    finished = latest.status.is_terminal
    code = status.HTTP_200_OK if finished or not created else status.HTTP_202_ACCEPTED
    return JSONResponse(body.model_dump(mode="json"), status_code=code, headers=headers)


@router.get(
    "", response_model=JobList, responses=_errors(401, 422), summary="List your jobs, newest first"
)
def list_jobs(
    services: ServicesDep,
    caller: CallerDep,
    request: Request,
    status_filter: Annotated[JobStatus | None, Query(alias="status")] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    cursor: Annotated[str | None, Query(pattern=r"^\d{1,19}$")] = None,
) -> JobList:
    page = services.store.page(caller.id, limit, cursor, status_filter)
    base_url = services.base_url(request)
    return JobList(
        data=[job_out(record, services, base_url) for record in page.jobs],
        next_cursor=page.next_cursor,
    )


@router.get("/{job_id}", response_model=JobOut, responses=_errors(401, 404), summary="Read a job")
def get_job(job_id: str, services: ServicesDep, caller: CallerDep, request: Request) -> JobOut:
    return job_out(services.owned_job(job_id, caller), services, services.base_url(request))


@router.post(
    "/{job_id}/cancel",
    response_model=JobOut,
    responses=_errors(401, 404, 409),
    summary="Cancel a queued or running job",
)
def cancel_job(job_id: str, services: ServicesDep, caller: CallerDep, request: Request) -> JobOut:
    record = services.owned_job(job_id, caller)
    result = services.store.transition(job_id, JobStatus.CANCELED, finished_at=utc_now())
    if not result.applied:
        if result.previous is None:
            raise ServiceError(ErrorType.NOT_FOUND, f"no job with id {job_id!r}")
        raise ServiceError(
            ErrorType.CONFLICT,
            f"the job is already {result.previous}; only queued or running jobs can be canceled",
        )
    count_finished(JobStatus.CANCELED)
    log.info("job %s canceled", job_id, extra={"job_id": job_id})
    services.webhooks.job_event(record, JobStatus.CANCELED)
    return job_out(services.owned_job(job_id, caller), services, services.base_url(request))
