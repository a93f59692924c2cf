"""The API's answers as the client reads them. Fields the client does not know are ignored, so a
server that adds some never breaks a client already deployed."""

import base64
from datetime import datetime
from enum import StrEnum
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field

Scheduler = Literal[
    "dpmpp_2m", "dpmpp_2m_karras", "euler", "euler_a", "ddim", "pndm", "lms", "unipc"
]
OutputFormat = Literal["png", "jpeg", "webp"]
SCHEDULERS: tuple[str, ...] = get_args(Scheduler)
OUTPUT_FORMATS: tuple[str, ...] = get_args(OutputFormat)


class Answer(BaseModel):
    """A part of an API answer: unknown fields are dropped, not refused."""

    model_config = ConfigDict(extra="ignore")


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"
    EXPIRED = "expired"

    @property
    def is_terminal(self) -> bool:
        return self in TERMINAL_STATES


TERMINAL_STATES = frozenset(
    {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELED, JobStatus.EXPIRED}
)


class Progress(Answer):
    step: int
    total: int
    eta_s: float | None = None


class ImageSafety(Answer):
    """What the server's safety checker made of an image."""

    checked: bool = True
    flagged: bool = False
    action: str | None = None
    reason: str | None = None


class ImageProvenance(Answer):
    """The marks a stored image carries: signed Content Credentials and the invisible watermark."""

    c2pa_manifest: bool
    development_signer: bool = False
    watermark: bool


class ImageOut(Answer):
    url: str | None = Field(default=None, description="None when the image was filtered")
    width: int
    height: int
    seed: int
    content_type: str
    filtered: bool = False
    safety: ImageSafety | None = None
    provenance: ImageProvenance | None = None


class Preview(Answer):
    """A live preview of a running job: its images so far, side by side, small."""

    step: int
    total: int
    width: int
    height: int
    # A data: URL, e.g. "data:image/webp;base64,...".
    image: str

    @property
    def content_type(self) -> str:
        return self.image[len("data:") :].split(";", 1)[0]

    @property
    def data(self) -> bytes:
        """The image file's bytes."""
        return base64.b64decode(self.image.split(",", 1)[1])


class JobError(Answer):
    type: str
    message: str


class Timings(Answer):
    queued_s: float | None = None
    render_s: float | None = None
    upload_s: float | None = None


class BatchInfo(Answer):
    id: str
    images: int


class JobRequest(Answer):
    """The request as the server normalized it, with the seed it resolved."""

    prompt: str
    negative_prompt: str = ""
    width: int
    height: int
    num_inference_steps: int
    guidance_scale: float
    scheduler: str
    seed: int | None = None
    num_images: int = 1
    output_format: str = "png"
    webhook: dict[str, Any] | None = None
    priority: str = "batch"
    model: str | None = None
    safety_action: str | None = None
    # Once stored, the server shows each input image by its SHA-256.
    init_image: str | None = None
    mask_image: str | None = None
    strength: float | None = None
    loras: list[dict[str, Any]] = Field(default_factory=list)
    # Its image, once stored, by its SHA-256.
    control: dict[str, Any] | None = None
    # Live previews: {"every_n_steps": ..., "format": ..., "max_size": ...}.
    preview: dict[str, Any] | None = None


class JobOut(Answer):
    id: str
    status: JobStatus
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    request: JobRequest
    # 1, more once the job went back to the queue after a lost worker.
    attempt: int = 1
    queue_position: int | None = None
    eta_s: float | None = None
    progress: Progress | None = None
    # While running, with previews asked for: the latest one.
    preview: Preview | None = None
    images: list[ImageOut] = Field(default_factory=list)
    error: JobError | None = None
    timings: Timings = Field(default_factory=Timings)
    batch: BatchInfo | None = None


class KeyUsage(Answer):
    """The calling key's queued and running jobs, and its share of the worker pool."""

    queued: int
    running: int
    weight: int = 1
    max_running: int | None = None
    priorities: list[str] = Field(default_factory=list)


class JobList(Answer):
    data: list[JobOut]
    next_cursor: str | None = None
    key: KeyUsage | None = None


class ManifestCheck(Answer):
    """What the server read of an image's C2PA manifest."""

    present: bool
    valid: bool
    validation_state: str | None = None
    failures: list[str] = Field(default_factory=list)
    signer: str | None = None
    development_signer: bool = False
    claim_generator: str | None = None
    claims: dict[str, Any] = Field(default_factory=dict)


class WatermarkCheck(Answer):
    """Whether the image's pixels carry the service's watermark, and whose job made it."""

    found: bool
    # "your_job" (then job_id and image_index say which) or "this_service".
    made_by: str | None = None
    job_id: str | None = None
    image_index: int | None = None
    confidence: float | None = None


class Verification(Answer):
    """`POST /v1/provenance/verify`'s answer."""

    c2pa: ManifestCheck
    watermark: WatermarkCheck
    summary: str
