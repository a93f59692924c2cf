"""The one error envelope and its closed set of types, mapped to HTTP status codes here only."""

from enum import StrEnum
from typing import Any

from pydantic import BaseModel


class ErrorType(StrEnum):
    VALIDATION_ERROR = "validation_error"
    UNAUTHORIZED = "unauthorized"
    FORBIDDEN = "forbidden"
    NOT_FOUND = "not_found"
    METHOD_NOT_ALLOWED = "method_not_allowed"
    CONFLICT = "conflict"
    PAYLOAD_TOO_LARGE = "payload_too_large"
    HEADERS_TOO_LARGE = "headers_too_large"
    RATE_LIMITED = "rate_limited"
    INTERNAL_ERROR = "internal_error"
    UNAVAILABLE = "unavailable"
    OVERLOADED = "overloaded"
    # A route that answers with the finished job waited longer than it may.
    TIMEOUT = "timeout"


HTTP_STATUS: dict[ErrorType, int] = {
    ErrorType.VALIDATION_ERROR: 422,
    ErrorType.UNAUTHORIZED: 401,
    ErrorType.FORBIDDEN: 403,
    ErrorType.NOT_FOUND: 404,
    ErrorType.METHOD_NOT_ALLOWED: 405,
    ErrorType.CONFLICT: 409,
    ErrorType.PAYLOAD_TOO_LARGE: 413,
    ErrorType.HEADERS_TOO_LARGE: 431,
    ErrorType.RATE_LIMITED: 429,
    ErrorType.INTERNAL_ERROR: 500,
    ErrorType.UNAVAILABLE: 503,
    # The queue is full: like a rate limit, the client should come back after Retry-After.
    ErrorType.OVERLOADED: 429,
    ErrorType.TIMEOUT: 504,
}


class ErrorBody(BaseModel):
    type: ErrorType
    message: str
    details: Any = None


class ErrorEnvelope(BaseModel):
    error: ErrorBody


class ServiceError(Exception):
    """An error that reaches the client as an envelope."""

    def __init__(
        self,
        error_type: ErrorType,
        message: str,
        details: Any = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.error_type = error_type
        self.message = message
        self.details = details
        self.headers = headers or {}

    @property
    def status_code(self) -> int:
        return HTTP_STATUS[self.error_type]

    def envelope(self) -> ErrorEnvelope:
        return ErrorEnvelope(
            error=ErrorBody(type=self.error_type, message=self.message, details=self.details)
        )
