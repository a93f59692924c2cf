"""Submit, read, list and cancel jobs."""

import json
import logging
import math
import re
import secrets
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Header, Path, Query, Request, Response, status
from fastapi.concurrency import run_in_threadpool
from fastapi.routing import APIRoute
from fastapi.security.utils import get_authorization_scheme_param
from pydantic import ValidationError
from starlette.datastructures import FormData, UploadFile
from starlette.types import Message

from api.deps import CallerDep, Services, ServicesDep, authenticate
from api.events import wait_until_terminal
from api.images import InputImages, read_input_images, upload_as_base64
from api.jobview import job_out, view_out
from api.metrics import JOBS_SUBMITTED
from api.openapi import RATE_LIMIT_HEADERS, error_responses, header
from shared.apikeys import ApiKey
from shared.asyncstore import JobView
from shared.errors import ErrorType, ServiceError
from shared.info import WorkerInfo
from shared.jobscripts import Created, QueueFull, RateLimit, RateLimited
from shared.jobstore import CasResult
from shared.lora_tags import split_lora_tags
from shared.metrics import count_finished
from shared.model_families import ModelTarget, model_target
from shared.queue import live_workers, render_queue
from shared.ratelimit import Decision
from shared.records import new_job_id, request_fingerprint, utc_now
from shared.schema import (
    CONTENT_TYPES,
    MAX_SEED,
    GenerationRequest,
    JobList,
    JobOut,
    JobRecord,
    JobStatus,
    KeyUsage,
    LoraSpec,
    PreviewSpec,
    strictest,
)
from shared.settings import ApiSettings
from shared.storage import StorageError, input_key, job_prefix
from shared.webhooks import WebhookRefused, check_webhook_url

log = logging.getLogger(__name__)

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

MAX_WAIT_S = 60
OCTET_STREAM = "application/octet-stream"
_PREFER_WAIT = re.compile(r"(?:^|[,;\s])wait\s*=\s*(\d+)", re.IGNORECASE)
IDEMPOTENCY_KEY_PATTERN = r"^[\x21-\x7e]{1,255}$"
# The image's own type; `application/octet-stream` when the client's Accept asks for only that.
IMAGE_CONTENT = {
    content_type: {"schema": {"type": "string", "format": "binary"}}
    for content_type in [*CONTENT_TYPES.values(), OCTET_STREAM]
}
_JOB_ID = {"job_id": "$response.body#/id"}
# Where a client goes from a submitted job (and what generated clients and fuzzers follow).
JOB_LINKS = {
    "GetJob": {"operationId": "get_job", "parameters": _JOB_ID},
    "CancelJob": {"operationId": "cancel_job", "parameters": _JOB_ID},
    "JobEvents": {"operationId": "job_events", "parameters": _JOB_ID},
    "JobWebhooks": {"operationId": "list_deliveries", "parameters": _JOB_ID},
    "RedeliverWebhook": {"operationId": "redeliver", "parameters": _JOB_ID},
    "FirstImage": {"operationId": "download_image", "parameters": {**_JOB_ID, "index": 0}},
}
_SUBMITTED_HEADERS = {
    "Location": header("the job's URL, `/v1/jobs/{id}`", required=True),
    **RATE_LIMIT_HEADERS,
}

_REPLICATION_HEADER = {
    "X-Replication": header(
        "`pending` when the job is on the Redis primary but fewer replicas than "
        "`T2I_REDIS_REPLICA_ACKS` confirmed it in time: it exists and runs all the same, and a "
        "failover now could lose it"
    )
}


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


def _check_priority(generation: GenerationRequest, caller: ApiKey) -> None:
    allowed = caller.share.priorities
    if generation.priority not in allowed:
        raise ServiceError(
            ErrorType.VALIDATION_ERROR,
            f"this API key may submit only {' and '.join(allowed)} jobs",
            [{"loc": ["body", "priority"], "msg": "priority not allowed", "type": "priority"}],
        )


def _rate_limited(decision: Decision) -> ServiceError:
    return ServiceError(
        ErrorType.RATE_LIMITED,
        f"over this key's limit of {decision.limit} jobs per minute",
        headers=decision.headers(),
    )


async def _queue_full(services: Services, depth: int, decision: Decision) -> ServiceError:
    retry_after = 5
    rate = (await services.jobs.rates()).rate
    if rate:
        retry_after = max(1, math.ceil(1 / rate))
    return ServiceError(
        ErrorType.OVERLOADED,
        f"the queue is full ({depth} jobs); retry later",
        headers={**decision.headers(), "Retry-After": str(retry_after)},
    )


def image_media_type(content_type: str, accept: str | None) -> str:
    """The image's type, unless the client accepts bytes and not that type."""
    accepted = accept or ""
    return (
        OCTET_STREAM if OCTET_STREAM in accepted and content_type not in accepted else content_type
    )


def _requested_wait_s(prefer: str | None) -> int:
    match = _PREFER_WAIT.search(prefer or "")
    return min(int(match.group(1)), MAX_WAIT_S) if match else 0


@dataclass(frozen=True)
class Submission:
    # The job as stored, with its queue position and the queue's rates.
    view: JobView
    # False when an earlier POST with the same Idempotency-Key made the job.
    created: bool
    rate_limit: Decision
    # False when the job is on the Redis primary only (T2I_REDIS_REPLICA_ACKS not met in time).
    replicated: bool = True

    @property
    def record(self) -> JobRecord:
        return self.view.record


def resolve_model(services: Services, model: str | None) -> tuple[ModelTarget, list[WorkerInfo]]:
    """The model a request names (None: the deployment's) as requests are checked against it, and
    the live workers it was told by."""
    workers = live_workers(services.redis, services.core.worker_heartbeat_max_age_s)
    named = model or services.core.deployment_model
    return model_target(services.redis, named, workers), workers


def with_family_sizes(generation: GenerationRequest, target: ModelTarget) -> GenerationRequest:
    """The request with the width and height it did not give set to the default size of the
    model's family; a 422 for a side outside the family's sizes."""
    family = target.family
    unset = {"width", "height"} - generation.model_fields_set
    if unset:
        generation = generation.model_copy(update=dict.fromkeys(unset, family.default_size))
    sides = {"width": generation.width, "height": generation.height}
    wrong = {
        side: value
        for side, value in sides.items()
        if not family.min_size <= value <= family.max_size or value % family.size_multiple
    }
    if not wrong:
        return generation
    allowed = (
        f"{family.min_size} to {family.max_size} pixels a side, in multiples of "
        f"{family.size_multiple}"
    )
    named = " and ".join(f"{side} {value}" for side, value in wrong.items())
    message = (
        f"{named}: outside the sizes of the model {target.model!r}, of the {family.title} "
        f"family: {allowed}; GET /v1/models lists each model's sizes"
    )
    raise ServiceError(
        ErrorType.VALIDATION_ERROR,
        message,
        [
            {
                "loc": ["body", side],
                "msg": f"outside the {family.title} family's sizes ({allowed})",
                "type": "size_out_of_family",
                "ctx": {
                    "family": family.name,
                    "min": family.min_size,
                    "max": family.max_size,
                    "multiple_of": family.size_multiple,
                },
            }
            for side in wrong
        ],
    )


def _check_model_served(
    generation: GenerationRequest, services: Services, workers: list[WorkerInfo]
) -> None:
    """A request may name the default model at any time (its jobs wait for a worker, as ever);
    another model only while a live worker serves it: nothing would ever take its jobs."""
    model = generation.model
    if model is None or model == services.core.deployment_model:
        return
    if model not in {worker.model for worker in workers}:
        raise ServiceError(
            ErrorType.VALIDATION_ERROR,
            f"no live worker serves the model {model!r}; GET /v1/models lists those served",
            [{"loc": ["body", "model"], "msg": "model not served", "type": "model_not_served"}],
        )


def _check_control_served(
    generation: GenerationRequest, services: Services, workers: list[WorkerInfo]
) -> None:
    """A control type only while a live worker of the job's model offers it."""
    if generation.control is None:
        return
    model = generation.model or services.core.deployment_model
    offered = {kind for worker in workers if worker.model == model for kind in worker.control_types}
    if generation.control.type not in offered:
        raise ServiceError(
            ErrorType.VALIDATION_ERROR,
            f"no live worker of the model {model!r} offers the control type "
            f"{generation.control.type!r}; GET /v1/models lists the control types",
            [
                {
                    "loc": ["body", "control", "type"],
                    "msg": "control type not served",
                    "type": "control_type_not_served",
                }
            ],
        )


def _resolved(
    generation: GenerationRequest, services: Services, caller: ApiKey, inputs: InputImages | None
) -> GenerationRequest:
    """The request as the job keeps it: a seed, the model, the safety action in force, and each
    input image by its SHA-256 (its bytes are in storage)."""
    update: dict[str, object] = {
        "model": generation.model or services.core.deployment_model,
        "safety_action": strictest(
            services.api.safety_action, caller.safety_action, generation.safety_action
        ),
    }
    if generation.seed is None:
        update["seed"] = secrets.randbelow(MAX_SEED + 1)
    if generation.preview is None and caller.preview_every_n_steps:
        update["preview"] = PreviewSpec(every_n_steps=caller.preview_every_n_steps)
    if inputs is not None:
        if inputs.init is not None:
            update["init_image"] = f"sha256:{inputs.init.sha256}"
        if inputs.mask is not None:
            update["mask_image"] = f"sha256:{inputs.mask.sha256}"
        if inputs.control is not None and generation.control is not None:
            image = f"sha256:{inputs.control.sha256}"
            update["control"] = generation.control.model_copy(update={"image": image})
    return generation.model_copy(update=update)


def _store_inputs(services: Services, job_id: str, inputs: InputImages | None) -> None:
    if inputs is None:
        return
    prefix = services.storage_settings.key_prefix
    # A storage failure here is a 503, like any other.
    for name, image in inputs.stored().items():
        services.storage.put(input_key(prefix, job_id, name), image.png, "image/png")


def _forget_inputs(services: Services, job_id: str, inputs: InputImages | None) -> None:
    if inputs is None:
        return
    try:
        services.storage.delete_prefix(job_prefix(services.storage_settings.key_prefix, job_id))
    except StorageError as exc:
        log.warning("could not delete the input images of unmade job %s: %s", job_id, exc)


def _with_prompt_loras(generation: GenerationRequest) -> GenerationRequest:
    """A prompt's `<lora:name:scale>` tags, as A1111 users write them, become its `loras` (only
    where the request gives none) and leave the prompt's text."""
    if generation.loras or "<lora:" not in generation.prompt.lower():
        return generation
    try:
        text, tags = split_lora_tags(generation.prompt)
        loras = [LoraSpec(name=name, scale=scale) for name, scale in tags]
        # Only the fields it gave: the ones it did not are filled in by the model's family.
        return GenerationRequest.model_validate(
            {**generation.model_dump(exclude_unset=True), "prompt": text, "loras": loras}
        )
    except ValueError as exc:
        reason = exc.errors()[0]["msg"] if isinstance(exc, ValidationError) else str(exc)
        message = f"the prompt's LoRA tags: {reason}"
        raise ServiceError(
            ErrorType.VALIDATION_ERROR,
            message,
            [{"loc": ["body", "prompt"], "msg": message, "type": "value_error"}],
        ) from exc


async def submit(
    services: Services,
    caller: ApiKey,
    generation: GenerationRequest,
    idempotency_key: str | None = None,
) -> Submission:
    """The one way a job comes to be, whichever API asked: limits, the job record, the queue.
    What costs little comes first (checks, the idempotency record, the rate limit's token), then
    fetching and storing input images, which are deleted again unless the job is made."""
    generation = _with_prompt_loras(generation)
    target, workers = await run_in_threadpool(resolve_model, services, generation.model)
    # First: the sizes of a model nobody serves would be no one's.
    _check_model_served(generation, services, workers)
    generation = with_family_sizes(generation, target)
    _check_pixel_budget(generation, services.api.max_pixels_per_job)
    _check_priority(generation, caller)
    if generation.webhook is not None:
        # It may resolve the host name: off the event loop.
        await run_in_threadpool(_check_webhook, generation, services)
    if generation.loras:
        await run_in_threadpool(
            services.loras.check, generation.loras, services.core.lora_max_rank, target
        )
    _check_control_served(generation, services, workers)
    per_minute = caller.rate_limit_per_min
    # The fingerprint is of the body as sent with its size filled in, so a retry without a seed
    # matches its original.
    fingerprint = request_fingerprint(generation)
    earlier, tokens_left = await _admit(services, caller, idempotency_key, fingerprint)
    if earlier is not None:
        return Submission(earlier, False, Decision.of(True, tokens_left, per_minute))
    inputs: InputImages | None = None
    if generation.init_image is not None or generation.control is not None:
        inputs = await read_input_images(
            generation, services.api, services.webhook_settings, caller.id
        )
    job_id = new_job_id()
    created = False
    try:
        # Stored before the job exists, so no worker can take it before its images are there.
        if inputs is not None:
            await run_in_threadpool(_store_inputs, services, job_id, inputs)
        view, created, replicated = await _enqueue(
            services, caller, generation, idempotency_key, fingerprint, job_id, inputs
        )
    except QueueFull as full:
        decision = Decision.of(True, tokens_left, per_minute)
        raise await _queue_full(services, full.depth, decision) from full
    finally:
        if not created and inputs is not None:
            await run_in_threadpool(_forget_inputs, services, job_id, inputs)
    return Submission(view, created, Decision.of(True, tokens_left, per_minute), replicated)


async def _admit(
    services: Services, caller: ApiKey, idempotency_key: str | None, fingerprint: str
) -> tuple[JobView | None, float]:
    """The job an earlier POST with this Idempotency-Key made (spending no token), or None with a
    token spent for a new one; and the tokens left in the caller's bucket."""
    limit = RateLimit(caller.id, caller.rate_limit_per_min)
    while True:
        try:
            admitted = await services.jobs.admit(caller.id, idempotency_key, limit)
        except RateLimited as limited:
            decision = Decision.of(False, limited.tokens_left, caller.rate_limit_per_min)
            raise _rate_limited(decision) from limited
        tokens_left = admitted.tokens_left or 0.0
        if admitted.earlier is None:
            return None, tokens_left
        assert idempotency_key is not None
        earlier = await _earlier_job(
            services, caller, idempotency_key, admitted.earlier, fingerprint
        )
        if earlier is not None:
            return earlier, tokens_left


async def _earlier_job(
    services: Services, caller: ApiKey, idempotency_key: str, earlier: Created, fingerprint: str
) -> JobView | None:
    """The job an idempotency key names, for a request with this body; None (the key forgotten)
    when the job is past its retention and the key no longer protects anything."""
    if earlier.fingerprint != fingerprint:
        raise ServiceError(
            ErrorType.CONFLICT,
            "this Idempotency-Key was used with a different request body",
            {"job_id": earlier.job_id},
        )
    view = await services.jobs.read(earlier.job_id)
    if view is None:
        await services.jobs.forget_idempotency_key(caller.id, idempotency_key)
    return view


def cancel(services: Services, record: JobRecord) -> CasResult:
    """Cancel a queued or running job; `applied` false when it had already ended."""
    result = services.store.transition(record.id, JobStatus.CANCELED, finished_at=utc_now())
    if result.applied:
        count_finished(JobStatus.CANCELED)
        log.info("job %s canceled", record.id, extra={"job_id": record.id})
        services.webhooks.job_event(record, JobStatus.CANCELED)
    return result


async def _enqueue(
    services: Services,
    caller: ApiKey,
    generation: GenerationRequest,
    idempotency_key: str | None,
    fingerprint: str,
    job_id: str,
    inputs: InputImages | None,
) -> tuple[JobView, bool, bool]:
    """Create the job with its broker message, its token already spent (or find the one this
    idempotency key made since): the job, whether it is new, and whether the replicas asked for
    hold it."""
    resolved = _resolved(generation, services, caller, inputs)
    record = JobRecord(
        id=job_id,
        owner=caller.id,
        status=JobStatus.QUEUED,
        created_at=utc_now(),
        request=resolved,
        watermark=not caller.watermark_exempt,
    )
    while True:
        created, view = await services.jobs.create(
            record,
            idempotency_key,
            fingerprint,
            services.api.max_queue_depth,
            render_queue(services.core, resolved.model),
            None,
        )
        if view is not None:
            break
        # A concurrent POST with the same key made its job between our admission and now.
        assert idempotency_key is not None
        earlier = await _earlier_job(services, caller, idempotency_key, created, fingerprint)
        if earlier is not None:
            return earlier, False, True
    JOBS_SUBMITTED.inc()
    log.info("job %s queued", record.id, extra={"job_id": record.id})
    if not created.replicated:
        log.warning(
            "job %s is on the Redis primary only: no replica confirmed it in time",
            record.id,
            extra={"job_id": record.id},
        )
    return view, True, created.replicated


_MULTIPART = "multipart/form-data"
# A multipart request's file parts, and where each goes in the JSON request.
_IMAGE_PARTS = {
    "init_image": ("init_image",),
    "mask_image": ("mask_image",),
    "control_image": ("control", "image"),
}
_REQUEST_PARTS = ("request", "json")
_Endpoint = TypeVar("_Endpoint", bound=Callable[..., Any])


def _media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


def _bad_part(part: str, message: str, kind: str) -> ServiceError:
    return ServiceError(
        ErrorType.VALIDATION_ERROR,
        f"{part}: {message}",
        [{"loc": ["body", part], "msg": message, "type": kind}],
    )


async def _request_part(form: FormData, api: ApiSettings) -> dict[str, Any]:
    """The JSON request from the `request` (or `json`) part, a text field or a file."""
    named = [name for name in _REQUEST_PARTS if name in form]
    if not named:
        raise _bad_part(
            "request",
            "a multipart request needs the part `request` with the JSON request",
            "missing",
        )
    if len(named) > 1 or len(form.getlist(named[0])) > 1:
        raise _bad_part(named[0], "send one `request` (or `json`) part", "too_many_parts")
    part = form[named[0]]
    text = await part.read(api.max_body_bytes + 1) if isinstance(part, UploadFile) else part
    try:
        body = json.loads(text)
    except (ValueError, UnicodeDecodeError) as exc:
        raise _bad_part(named[0], f"not JSON: {exc}", "json_invalid") from exc
    if not isinstance(body, dict):
        raise _bad_part(named[0], "the JSON request must be an object", "model_type")
    return body


async def _multipart_body(form: FormData, api: ApiSettings) -> bytes:
    """The JSON request a multipart one stands for, its file parts in it as base64."""
    for name in form:
        if name not in _IMAGE_PARTS and name not in _REQUEST_PARTS:
            expected = ", ".join(f"`{part}`" for part in [*_REQUEST_PARTS, *_IMAGE_PARTS])
            raise _bad_part(name, f"not a part this route reads ({expected})", "extra_forbidden")
    body = await _request_part(form, api)
    for part, (*parents, field) in _IMAGE_PARTS.items():
        if part not in form:
            continue
        uploads = form.getlist(part)
        if len(uploads) > 1 or not isinstance(uploads[0], UploadFile):
            raise _bad_part(part, "send the image as one file part", "image_invalid")
        data = await uploads[0].read(api.max_input_image_bytes + 1)
        target = body
        for parent in parents:
            target = target.get(parent)
            if not isinstance(target, dict):
                raise _bad_part(part, f"needs a `{parent}` object in the `request` part", "missing")
        target[field] = upload_as_base64(part, data, api)
    return json.dumps(body).encode()


def _as_json(request: Request, body: bytes) -> Request:
    """The same request, its body the JSON request `body`."""
    headers = [
        (name, value)
        for name, value in request.scope["headers"]
        if name not in (b"content-type", b"content-length")
    ]
    headers += [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    sent = False

    async def receive() -> Message:
        nonlocal sent
        if sent:
            # The upload is read: what comes next is the client going away.
            return await request.receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return Request({**request.scope, "headers": headers}, receive)


def _name_parts(error: ServiceError) -> None:
    """An error about the control image names its part, `control_image`."""
    if not isinstance(error.details, list):
        return
    for detail in error.details:
        if isinstance(detail, dict) and detail.get("loc") == ["body", "control", "image"]:
            detail["loc"] = ["body", "control_image"]
            error.message = error.message.replace("control.image:", "control_image:", 1)


class _JobsRoute(APIRoute):
    """`POST /v1/jobs` also takes multipart/form-data: its `request` (or `json`) part holds the
    JSON request and its file parts `init_image`, `mask_image` and `control_image` the images.
    The images are checked for the byte cap here and sent on as base64 in the JSON request, which
    then takes exactly the JSON route's way: the same checks, the same job, the same answer.

    The OpenAPI document declares only the JSON body (docs/api.md describes the multipart form):
    the OpenAPI fuzzing cannot tell an image part from any binary string."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handle_json = super().get_route_handler()

        async def handle(request: Request) -> Response:
            if _media_type(request) != _MULTIPART:
                return await handle_json(request)
            services: Services = request.app.state.services
            # Credentials first, as on the JSON route: no stranger learns how a form is read.
            scheme, token = get_authorization_scheme_param(request.headers.get("authorization"))
            presented = token if scheme.lower() == "bearer" else None
            await authenticate(services, presented, "Bearer", "Authorization: Bearer <key>")
            async with request.form(max_files=len(_IMAGE_PARTS), max_fields=4) as form:
                body = await _multipart_body(form, services.api)
            try:
                return await handle_json(_as_json(request, body))
            except ServiceError as error:
                _name_parts(error)
                raise

        return handle


def _post_with_uploads(**kwargs: Any) -> Callable[[_Endpoint], _Endpoint]:
    """`@router.post("", ...)`, served by the route that also reads multipart/form-data."""

    def register(endpoint: _Endpoint) -> _Endpoint:
        router.add_api_route(
            "", endpoint, methods=["POST"], route_class_override=_JobsRoute, **kwargs
        )
        return endpoint

    return register


@_post_with_uploads(
    status_code=status.HTTP_202_ACCEPTED,
    response_model=JobOut,
    responses={
        202: {
            "headers": {
                **_SUBMITTED_HEADERS,
                **_REPLICATION_HEADER,
            },
            "links": JOB_LINKS,
        },
        200: {
            "model": JobOut,
            "description": "finished within `Prefer: wait`, or a replay of an idempotent POST",
            "headers": {
                **_SUBMITTED_HEADERS,
                "Idempotent-Replayed": header("`true` when an earlier POST made this job"),
                "Preference-Applied": header("`wait=N` when the answer waited"),
                **_REPLICATION_HEADER,
            },
            "links": JOB_LINKS,
        },
        **error_responses(401, 409, 413, 422, 429, 503),
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
        Header(
            pattern=IDEMPOTENCY_KEY_PATTERN,
            description="1-255 visible ASCII characters; retrying with the same key and body "
            "returns the same job (24 h)",
        ),
    ] = None,
    prefer: Annotated[
        str | None, Header(description="`wait=N` holds the answer up to N s (at most 60)")
    ] = None,
) -> Response:
    submission = await submit(services, caller, generation, idempotency_key)
    view, created = submission.view, submission.created
    record = view.record
    headers = {"Location": f"/v1/jobs/{record.id}", **submission.rate_limit.headers()}
    wait_s = _requested_wait_s(prefer)
    if wait_s:
        headers["Preference-Applied"] = f"wait={wait_s}"
        await wait_until_terminal(services, record.id, wait_s)
        view = await services.jobs.read(record.id) or view
    if not created:
        headers["Idempotent-Replayed"] = "true"
    if not submission.replicated:
        headers["X-Replication"] = "pending"
    body = view_out(view, services, services.base_url(request))
    finished = view.record.status.is_terminal
    code = status.HTTP_200_OK if finished or not created else status.HTTP_202_ACCEPTED
    return Response(body.model_dump_json(), code, headers, media_type="application/json")


@router.get(
    "",
    response_model=JobList,
    responses=error_responses(401, 422, 503),
    summary="List your jobs, newest first",
)
async def list_jobs(
    services: ServicesDep,
    caller: CallerDep,
    request: Request,
    status_filter: Annotated[JobStatus | None, Query(alias="status")] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    cursor: Annotated[str | None, Query(pattern=r"^\d{1,19}$")] = None,
) -> Response:
    page = await services.jobs.page(caller.id, limit, cursor, status_filter)
    base_url = services.base_url(request)
    views = await services.jobs.queue_views(page.jobs)
    queued, running = await services.jobs.key_counts(caller.id)
    share = caller.share
    listing = JobList(
        data=[view_out(view, services, base_url) for view in views],
        next_cursor=page.next_cursor,
        key=KeyUsage(
            queued=queued,
            running=running,
            weight=share.weight,
            max_running=share.max_running or None,
            priorities=list(share.priorities),
        ),
    )
    # Serialized once, here: the response model would validate every job again.
    return Response(listing.model_dump_json(), media_type="application/json")


@router.get(
    "/{job_id}",
    response_model=JobOut,
    responses=error_responses(401, 404, 422, 503),
    summary="Read a job",
)
async def get_job(
    job_id: str, services: ServicesDep, caller: CallerDep, request: Request
) -> JobOut:
    view = await services.owned_view(job_id, caller)
    job = view_out(view, services, services.base_url(request))
    if job.status is JobStatus.RUNNING and job.request.preview is not None:
        # Read only for a running job that asked for previews: no cost to any other read.
        job.preview = await services.jobs.preview(job_id)
    return job


@router.post(
    "/{job_id}/cancel",
    response_model=JobOut,
    responses=error_responses(401, 404, 409, 422, 503),
    summary="Cancel a queued or running job",
)
def cancel_job(job_id: str, services: ServicesDep, caller: CallerDep, request: Request) -> JobOut:
    result = cancel(services, services.owned_job(job_id, caller))
    if not result.applied:
        if result.previous is None:
            raise ServiceError(ErrorType.NOT_FOUND, f"no job with id {job_id!r}")
        raise ServiceError(
            ErrorType.CONFLICT,
            f"the job is already {result.previous}; only queued or running jobs can be canceled",
        )
    return job_out(services.owned_job(job_id, caller), services, services.base_url(request))


@router.get(
    "/{job_id}/images/{index}",
    response_class=Response,
    responses={
        200: {"content": IMAGE_CONTENT, "description": "the image, in the job's output format"},
        **error_responses(401, 404, 409, 422, 503),
    },
    summary="Download one of a succeeded job's images",
)
def download_image(
    job_id: str,
    index: Annotated[int, Path(ge=0, le=7, description="0 for the first image")],
    services: ServicesDep,
    caller: CallerDep,
    accept: Annotated[str | None, Header(include_in_schema=False)] = None,
) -> Response:
    record = services.owned_job(job_id, caller)
    if record.status is not JobStatus.SUCCEEDED:
        raise ServiceError(
            ErrorType.CONFLICT, f"the job is {record.status}; it has images once it has succeeded"
        )
    if index >= len(record.images):
        raise ServiceError(ErrorType.NOT_FOUND, f"the job has {len(record.images)} image(s)")
    image = record.images[index]
    if image.key is None:
        raise ServiceError(
            ErrorType.NOT_FOUND, f"image {index} was filtered by the safety checker and not stored"
        )
    media_type = image_media_type(image.content_type, accept)
    return Response(services.storage.get(image.key), media_type=media_type)
