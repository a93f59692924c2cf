"""Typed client errors: one class per error type of the API's envelope, plus the client's own."""

import email.utils
import time
from typing import Any

import httpx

from txt2img.models import JobOut


class Txt2ImgError(Exception):
    """Any error the client raises: an API error envelope, a transport failure or a failed job."""

    default_type = "error"

    def __init__(
        self,
        message: str,
        *,
        type: str | None = None,
        details: Any = None,
        status_code: int | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.type = type or self.default_type
        self.details = details
        self.status_code = status_code

    def __str__(self) -> str:
        return f"{self.type}: {self.message}"


class ValidationError(Txt2ImgError):
    default_type = "validation_error"


class Unauthorized(Txt2ImgError):
    default_type = "unauthorized"


class Forbidden(Txt2ImgError):
    default_type = "forbidden"


class NotFound(Txt2ImgError):
    default_type = "not_found"


class Conflict(Txt2ImgError):
    default_type = "conflict"


class PayloadTooLarge(Txt2ImgError):
    default_type = "payload_too_large"


class RateLimited(Txt2ImgError):
    default_type = "rate_limited"

    def __init__(self, message: str, *, retry_after: float | None = None, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.retry_after = retry_after


class ServerError(Txt2ImgError):
    default_type = "internal_error"


class Unavailable(ServerError):
    default_type = "unavailable"


class APIConnectionError(Txt2ImgError):
    default_type = "connection_error"


class StreamUnavailable(Txt2ImgError):
    default_type = "stream_unavailable"


class WaitTimeout(Txt2ImgError, TimeoutError):
    default_type = "timeout"

    def __init__(self, job_id: str, timeout_s: float) -> None:
        super().__init__(f"job {job_id} did not finish within {timeout_s:g} s")
        self.job_id = job_id


class JobFailed(Txt2ImgError):
    """A job that ended failed, canceled or expired; `job` is its final record."""

    def __init__(self, job: JobOut) -> None:
        reason = f": {job.error.message}" if job.error else ""
        super().__init__(
            f"job {job.id} {job.status.value}{reason}",
            type=job.error.type if job.error else f"job_{job.status.value}",
        )
        self.job = job


_BY_TYPE: dict[str, type[Txt2ImgError]] = {
    "validation_error": ValidationError,
    "unauthorized": Unauthorized,
    "forbidden": Forbidden,
    "not_found": NotFound,
    "conflict": Conflict,
    "payload_too_large": PayloadTooLarge,
    "rate_limited": RateLimited,
    "internal_error": ServerError,
    "unavailable": Unavailable,
    "overloaded": Unavailable,
}
_BY_STATUS: dict[int, type[Txt2ImgError]] = {
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
    409: Conflict,
    413: PayloadTooLarge,
    422: ValidationError,
    429: RateLimited,
    503: Unavailable,
}


def _retry_after_s(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    try:
        moment = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(moment.timestamp() - time.time(), 0.0)


def error_from_response(response: httpx.Response) -> Txt2ImgError:
    """The typed error for a non-2xx answer, from its envelope or, failing that, its status."""
    status = response.status_code
    try:
        body = response.json()["error"]
        error_type, message, details = str(body["type"]), str(body["message"]), body.get("details")
    except (ValueError, KeyError, TypeError):
        # Not our envelope: a proxy's page or an object store's XML.
        error_type, message, details = None, f"HTTP {status} {response.reason_phrase}", None
    if error_type in _BY_TYPE:
        cls = _BY_TYPE[error_type]
    else:
        cls = _BY_STATUS.get(status, ServerError if status >= 500 else Txt2ImgError)
    kwargs: dict[str, Any] = {"type": error_type, "details": details, "status_code": status}
    if cls is RateLimited:
        kwargs["retry_after"] = _retry_after_s(response.headers.get("retry-after"))
    return cls(message, **kwargs)
