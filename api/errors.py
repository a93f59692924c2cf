"""Every error leaves the API as the one envelope; tracebacks stay in the logs."""

import logging
import uuid

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import iter_route_contexts
from redis import exceptions as redis_errors
from redis.exceptions import RedisError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from shared.errors import HTTP_STATUS, ErrorType, ServiceError
from shared.logs import RepeatedFailures
from shared.redisconn import NotReplicated
from shared.storage import MissingObject, StorageError

log = logging.getLogger(__name__)
# During an outage every request fails the same way: a line per request would bury the rest.
_REDIS_OUTAGE = RepeatedFailures(log, "Redis, for requests")
_STORAGE_OUTAGE = RepeatedFailures(log, "the image store, for requests")

# Redis away, loading, read-only, full, failing over or short of replicas: a retry may work. Any
# other RedisError (an argument redis-py cannot send, a script that fails) is a fault in our code.
_REDIS_OUTAGES = (
    redis_errors.ConnectionError,
    redis_errors.TimeoutError,
    redis_errors.InvalidResponse,
    redis_errors.ReadOnlyError,
    redis_errors.OutOfMemoryError,
    redis_errors.ClusterDownError,
    redis_errors.TryAgainError,
    redis_errors.WatchError,
    NotReplicated,
)
# The same, from replies that redis-py raises as a plain ResponseError.
_OUTAGE_REPLY_CODES = frozenset({"MISCONF", "NOREPLICAS", "MASTERDOWN", "BUSY", "LOADING"})

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


def _first_problem(details: list[dict[str, object]]) -> str:
    """`the request is not valid: FIELD: WHY`, naming the first field at fault."""
    if not details:
        return "the request is not valid"
    first = details[0]
    location = first["loc"] if isinstance(first["loc"], list) else []
    field = ".".join(str(part) for part in location[1:]) or "the body"
    more = f" (and {len(details) - 1} more)" if len(details) > 1 else ""
    return f"the request is not valid: {field}: {first['msg']}{more}"


def _allowed_methods(request: Request) -> str:
    """Every method some route serves at this path: the router's own 405 names only one route's."""
    methods: set[str] = set()
    for route in iter_route_contexts(request.app.routes):
        if route.methods and route.matches(request.scope)[0] is not Match.NONE:
            methods |= route.methods
    return ", ".join(sorted(methods))


def _http_error(request: Request, exc: StarletteHTTPException) -> ServiceError:
    # A 400 from the framework is a body it could not even parse: a validation error to us.
    fallback = ErrorType.VALIDATION_ERROR if exc.status_code < 500 else ErrorType.INTERNAL_ERROR
    error_type = _TYPE_BY_STATUS.get(exc.status_code, fallback)
    headers = dict(exc.headers or {})
    if exc.status_code == 405:
        headers["Allow"] = _allowed_methods(request)
    return ServiceError(error_type, str(exc.detail), headers=headers)


def _is_redis_outage(exc: Exception) -> bool:
    if isinstance(exc, _REDIS_OUTAGES):
        return True
    if not isinstance(exc, redis_errors.ResponseError):
        return False
    return str(exc).split(" ", 1)[0] in _OUTAGE_REPLY_CODES


def as_service_error(request: Request, exc: Exception) -> ServiceError:
    """Any exception as the error the client hears; an unexpected one is logged with an id."""
    if isinstance(exc, ServiceError):
        return exc
    if isinstance(exc, RequestValidationError):
        details = _validation_details(exc)
        return ServiceError(ErrorType.VALIDATION_ERROR, _first_problem(details), details)
    if isinstance(exc, StarletteHTTPException):
        return _http_error(request, exc)
    if _is_redis_outage(exc):
        _REDIS_OUTAGE.failed(exc, expected=True)
        return ServiceError(ErrorType.UNAVAILABLE, "the job store is unavailable; retry shortly")
    if isinstance(exc, MissingObject):
        return ServiceError(ErrorType.NOT_FOUND, str(exc))
    if isinstance(exc, StorageError):
        _STORAGE_OUTAGE.failed(exc, expected=True)
        return ServiceError(ErrorType.UNAVAILABLE, "the image store is unavailable; retry shortly")
    error_id = uuid.uuid4().hex
    log.error(
        "internal error %s during %s %s",
        error_id,
        request.method,
        request.url.path,
        exc_info=exc,
    )
    return ServiceError(
        ErrorType.INTERNAL_ERROR,
        f"internal error; quote error id {error_id} when reporting it",
        {"error_id": error_id},
    )


def install_error_handlers(app: FastAPI) -> None:
    async def _answer(request: Request, exc: Exception) -> JSONResponse:
        return error_response(as_service_error(request, exc))

    # Each expected kind by name: Starlette hands `Exception` to its outermost middleware, which
    # answers with the handler and then re-raises, so the server logs a traceback.
    handled = (
        ServiceError,
        RequestValidationError,
        StarletteHTTPException,
        RedisError,
        StorageError,
        Exception,
    )
    for kind in handled:
        app.add_exception_handler(kind, _answer)
