"""Python client and CLI for the txt2img service."""

from shared.schema import ImageOut, JobList, JobOut, JobStatus, Progress
from txt2img._core import Event, GenerationFields
from txt2img.aio import AsyncClient
from txt2img.client import Client
from txt2img.errors import (
    APIConnectionError,
    Conflict,
    Forbidden,
    JobFailed,
    NotFound,
    PayloadTooLarge,
    RateLimited,
    ServerError,
    StreamUnavailable,
    Txt2ImgError,
    Unauthorized,
    Unavailable,
    ValidationError,
    WaitTimeout,
)

__all__ = [
    "APIConnectionError",
    "AsyncClient",
    "Client",
    "Conflict",
    "Event",
    "Forbidden",
    "GenerationFields",
    "ImageOut",
    "JobFailed",
    "JobList",
    "JobOut",
    "JobStatus",
    "NotFound",
    "PayloadTooLarge",
    "Progress",
    "RateLimited",
    "ServerError",
    "StreamUnavailable",
    "Txt2ImgError",
    "Unauthorized",
    "Unavailable",
    "ValidationError",
    "WaitTimeout",
]
