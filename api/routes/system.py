"""Liveness, readiness, what the service serves, and local-storage downloads."""

import mimetypes
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Annotated

from fastapi import APIRouter, Header, Query
from fastapi.responses import FileResponse, JSONResponse
from redis.exceptions import RedisError

from api.deps import CallerDep, Services, ServicesDep
from api.openapi import error_responses
from api.routes.jobs import IMAGE_CONTENT, image_media_type
from shared.backlog import read_backlog
from shared.errors import ErrorType, ServiceError
from shared.info import (
    SCHEDULERS,
    SERVICE_VERSION,
    Backlog,
    ModelInfo,
    ModelList,
    ServedModel,
    ServiceInfo,
    request_limits,
)
from shared.loras import LoraList
from shared.model_families import model_target
from shared.queue import live_worker_count, live_workers, render_queue
from shared.storage import LocalStorage, StorageError

router = APIRouter(tags=["system"])

# /ready answers within this long whatever Redis or storage do; a check still running then is
# reported as not answering (and finishes, or times out, on its own thread).
READY_DEADLINE_S = 1.0
_checks = ThreadPoolExecutor(max_workers=4, thread_name_prefix="ready-check")


@router.get("/health", summary="The API process is alive", responses=error_responses())
def health(services: ServicesDep) -> dict[str, str]:
    instance = services.api.instance
    return {"status": "ok"} if instance is None else {"status": "ok", "instance": instance}


@router.get(
    "/ready",
    summary="Redis and storage reachable and a worker alive",
    responses=error_responses(422, 503),
)
def ready(
    services: ServicesDep,
    require_worker: Annotated[
        bool,
        Query(
            description="false: ready without a live worker (an API probe where workers scale "
            "to zero: jobs wait in the queue until one starts)"
        ),
    ] = True,
) -> JSONResponse:
    deadline = time.monotonic() + READY_DEADLINE_S
    redis_check = _checks.submit(_check_redis, services)
    storage_check = _checks.submit(_check_storage, services)
    checks: dict[str, str] = {}
    try:
        checks.update(redis_check.result(timeout=max(0.0, deadline - time.monotonic())))
    except FutureTimeout:
        checks.update(redis=f"no answer within {READY_DEADLINE_S} s", workers="unknown")
    try:
        checks["storage"] = storage_check.result(timeout=max(0.0, deadline - time.monotonic()))
    except FutureTimeout:
        checks["storage"] = f"no answer within {READY_DEADLINE_S} s"
    worker_ok = checks["workers"] != "none alive" or not require_worker
    if checks["redis"] == "ok" and checks["storage"] == "ok" and worker_ok:
        return JSONResponse({"status": "ready", "checks": checks})
    raise ServiceError(ErrorType.UNAVAILABLE, "not ready", checks)


def _check_redis(services: Services) -> dict[str, str]:
    try:
        services.redis.ping()
        workers = live_worker_count(services.redis, services.core.worker_heartbeat_max_age_s)
    except RedisError as exc:
        return {"redis": f"unreachable ({type(exc).__name__})", "workers": "unknown"}
    return {"redis": "ok", "workers": f"{workers} alive" if workers else "none alive"}


def _check_storage(services: Services) -> str:
    try:
        services.storage.check()
    except StorageError as exc:
        return str(exc)
    return "ok"


@router.get(
    "/info",
    response_model=ServiceInfo,
    summary="Version, request limits, and the live workers with their models and levers",
    responses=error_responses(503),
)
def info(services: ServicesDep) -> ServiceInfo:
    workers = live_workers(services.redis, services.core.worker_heartbeat_max_age_s)
    models = sorted({worker.model for worker in workers})
    return ServiceInfo(
        version=SERVICE_VERSION,
        models=models,
        served_models=[
            ServedModel.of(model, model_target(services.redis, model, workers).family)
            for model in models
        ],
        schedulers=SCHEDULERS,
        limits=request_limits(services.api.max_pixels_per_job),
        workers=workers,
    )


@router.get(
    "/v1/models",
    response_model=ModelList,
    summary="The models served: the default, and every model a live worker serves",
    responses=error_responses(401, 503),
)
def list_models(services: ServicesDep, caller: CallerDep) -> ModelList:
    workers = live_workers(services.redis, services.core.worker_heartbeat_max_age_s)
    default = services.core.deployment_model
    counts = Counter(worker.model for worker in workers)
    backlog = read_backlog(services.store, services.core, workers).queues
    control_types: dict[str, set[str]] = {}
    for worker in workers:
        control_types.setdefault(worker.model, set()).update(worker.control_types)
    return ModelList(
        data=[
            ModelInfo.of(
                model,
                model_target(services.redis, model, workers).family,
                default=model == default,
                workers=counts[model],
                queued=backlog[render_queue(services.core, model)].queued,
                control_types=sorted(control_types.get(model, set())),
            )
            for model in sorted({default, *counts})
        ]
    )


@router.get(
    "/backlog",
    response_model=Backlog,
    summary="Jobs waiting and running per model queue: what the worker autoscaler reads",
    responses=error_responses(503),
)
def backlog(services: ServicesDep) -> Backlog:
    workers = live_workers(services.redis, services.core.worker_heartbeat_max_age_s)
    return read_backlog(services.store, services.core, workers)


@router.get(
    "/v1/loras",
    response_model=LoraList,
    summary="The LoRA adapters a request's `loras` may name",
    responses=error_responses(401),
)
def list_loras(services: ServicesDep, caller: CallerDep) -> LoraList:
    return services.loras.listing()


@router.get(
    "/v1/files/{key:path}",
    summary="Download an image from local storage through a signed URL",
    responses={
        200: {"content": IMAGE_CONTENT, "description": "the image"},
        **error_responses(403, 404, 422),
    },
    response_class=FileResponse,
)
def download_file(
    key: str,
    expires: int,
    signature: str,
    services: ServicesDep,
    accept: Annotated[str | None, Header(include_in_schema=False)] = None,
) -> FileResponse:
    storage = services.storage
    if not isinstance(storage, LocalStorage):
        raise ServiceError(ErrorType.NOT_FOUND, "files are served by the object store")
    if not storage.verify(key, expires, signature):
        raise ServiceError(ErrorType.FORBIDDEN, "the link is invalid or has expired")
    try:
        path = storage.path_for(key)
    except StorageError as exc:
        raise ServiceError(ErrorType.NOT_FOUND, "no such file") from exc
    if not path.is_file():
        raise ServiceError(ErrorType.NOT_FOUND, "no such file")
    media_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    return FileResponse(path, media_type=image_media_type(media_type, accept))
