"""Liveness, readiness and local-storage downloads."""

import mimetypes
import time
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout

from fastapi import APIRouter, status
from fastapi.responses import FileResponse, JSONResponse
from redis.exceptions import RedisError

from api.deps import Services, ServicesDep
from shared.errors import ErrorEnvelope, ErrorType, ServiceError
from shared.queue import live_worker_count
from shared.storage import LocalStorage, StorageError

router = APIRouter(tags=["system"])

# /ready answers within this long whatever Redis or storage do; a check still running then is
# reported as not answering (and finishes, or times out, on its own thread).
READY_DEADLINE_S = 1.0
_checks = ThreadPoolExecutor(max_workers=4, thread_name_prefix="ready-check")


@router.get("/health", summary="The API process is alive")
def health() -> dict[str, str]:
    return {"status": "ok"}


@router.get(
    "/ready",
    summary="Redis and storage reachable and a worker alive",
    responses={status.HTTP_503_SERVICE_UNAVAILABLE: {"model": ErrorEnvelope}},
)
def ready(services: ServicesDep) -> JSONResponse:
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
    if checks["redis"] == "ok" and checks["storage"] == "ok" and checks["workers"] != "none alive":
        return JSONResponse({"status": "ready", "checks": checks})
    raise ServiceError(ErrorType.UNAVAILABLE, "not ready", checks)


def _check_redis(services: Services) -> dict[str, str]:
    try:
        services.redis.ping()
        workers = live_worker_count(
            services.redis, services.core.worker_heartbeat_max_age_s, time.time()
        )
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
    "/v1/files/{key:path}",
    summary="Download an image from local storage through a signed URL",
    responses={
        status.HTTP_403_FORBIDDEN: {"model": ErrorEnvelope},
        status.HTTP_404_NOT_FOUND: {"model": ErrorEnvelope},
    },
    response_class=FileResponse,
)
def download_file(key: str, expires: int, signature: str, services: ServicesDep) -> FileResponse:
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
    return FileResponse(path, media_type=media_type)
