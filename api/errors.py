"""Every error leaves the API as the one envelope; tracebacks stay in the logs."""

import logging
import uuid

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from redis.exceptions import RedisError
from starlette.exceptions import HTTPException as StarletteHTTPException

from shared.errors import HTTP_STATUS, ErrorType, ServiceError

log = logging.getLogger(__name__)

_TYPE_BY_STATUS = {status: error_type for error_type, status in HTTP_STATUS.items()}


def error_response(error: ServiceError) -> JSONResponse:
    return JSONResponse(
        status_code=error.status_code,
        content=error.envelope().model_dump(mode="json"),
        headers=error.headers,
    )


def _validation_details(exc: RequestValidationError) -> list[dict[str, object]]:
    return [
        {"loc": list(item.get("loc", ())), "msg": item.get("msg", ""), "type": item.get("type")}
        for item in exc.errors()
    ]


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, exc: ServiceError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(
            ServiceError(
                ErrorType.VALIDATION_ERROR, "the request is not valid", _validation_details(exc)
            )
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # A 400 from the framework is a body it could not even parse: a validation error to us.
        fallback = ErrorType.VALIDATION_ERROR if exc.status_code < 500 else ErrorType.INTERNAL_ERROR
        error_type = _TYPE_BY_STATUS.get(exc.status_code, fallback)
        return error_response(ServiceError(error_type, str(exc.detail), headers=exc.headers))

    @app.exception_handler(RedisError)
    async def _redis_error(request: Request, exc: RedisError) -> JSONResponse:
        log.warning("Redis unavailable during %s %s: %s", request.method, request.url.path, exc)
        return error_response(
            ServiceError(ErrorType.UNAVAILABLE, "the job store is unavailable; retry shortly")
        )

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        error_id = uuid.uuid4().hex
        log.exception("internal error %s during %s %s", error_id, request.method, request.url.path)
        return error_response(
            ServiceError(
                ErrorType.INTERNAL_ERROR,
                f"internal error; quote error id {error_id} when reporting it",
                {"error_id": error_id},
            )
        )
