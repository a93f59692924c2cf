"""Liveness, readiness and local-storage downloads."""

import mimetypes
import time
from typing import Annotated

from fastapi import APIRouter, Header
from fastapi.responses import FileResponse, JSONResponse
from redis.exceptions import RedisError

from api.deps import ServicesDep
from api.openapi import error_responses
from api.routes.jobs import IMAGE_CONTENT, image_media_type
from shared.errors import ErrorType, ServiceError
from shared.queue import live_worker_count
from shared.storage import LocalStorage, StorageError

router = APIRouter(tags=["system"])


@router.get("/health", summary="The API process is alive", responses=error_responses())
def health() -> dict[str, str]:
    return {"status": "ok"}


@router.get(
    "/ready",
    summary="Redis and storage reachable and a worker alive",
    responses=error_responses(503),
)
def ready(services: ServicesDep) -> JSONResponse:
    checks: dict[str, str] = {}
    try:
        services.redis.ping()
        checks["redis"] = "ok"
        workers = live_worker_count(
            services.redis, services.core.worker_heartbeat_max_age_s, time.time()
        )
        checks["workers"] = f"{workers} alive" if workers else "none alive"
    except RedisError as exc:
        checks["redis"] = f"unreachable: {exc}"
        checks["workers"] = "unknown"
    try:
        services.storage.check()
        checks["storage"] = "ok"
    except StorageError as exc:
        checks["storage"] = str(exc)
    if checks["redis"] == "ok" and checks["storage"] == "ok" and checks["workers"] != "none alive":
        return JSONResponse({"status": "ready", "checks": checks})
    raise ServiceError(ErrorType.UNAVAILABLE, "not ready", checks)


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
