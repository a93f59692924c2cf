"""Python client and CLI for the txt2img service."""

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
from txt2img.models import (
    ImageOut,
    JobError,
    JobList,
    JobOut,
    JobStatus,
    Preview,
    Progress,
    Verification,
)
from txt2img.version import __version__

__all__ = [
    "APIConnectionError",
    "AsyncClient",
    "Client",
    "Conflict",
    "Event",
    "Forbidden",
    "GenerationFields",
    "ImageOut",
    "JobError",
    "JobFailed",
    "JobList",
    "JobOut",
    "JobStatus",
    "NotFound",
    "PayloadTooLarge",
    "Preview",
    "Progress",
    "RateLimited",
    "ServerError",
    "StreamUnavailable",
    "Txt2ImgError",
    "Unauthorized",
    "Unavailable",
    "ValidationError",
    "Verification",
    "WaitTimeout",
    "__version__",
]
