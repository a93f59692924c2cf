"""The job contract: the generation request, job states and the job record."""

from datetime import datetime
from enum import StrEnum
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

from shared.families import DEFAULT_FAMILY, MAX_SIZE, MIN_SIZE

MAX_SEED = 2**32 - 1

Scheduler = Literal[
    "dpmpp_2m", "dpmpp_2m_karras", "euler", "euler_a", "ddim", "pndm", "lms", "unipc"
]
OutputFormat = Literal["png", "jpeg", "webp"]
# Within one API key's jobs, interactive ones start before batch ones.
Priority = Literal["interactive", "batch"]
PRIORITIES: tuple[Priority, ...] = ("interactive", "batch")


def _integral(value: object) -> object:
    """JSON's 800.0 is the integer 800, as JSON Schema counts it; 800.5 is left to be refused."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


# Last in an integer's Annotated (after its Field, or its bounds leave the JSON schema): the
# field takes 800.0 for 800, but never "800".
WHOLE_FLOATS_AS_INT = BeforeValidator(_integral)
# The request's bounds, named so that the compatibility routes declare the same ones.
Prompt = Annotated[str, Field(min_length=1, max_length=2000, pattern=r"\S")]
NegativePrompt = Annotated[str, Field(max_length=2000)]
# Any family's sizes: the family of the model a request names narrows them at submission.
Dimension = Annotated[int, Field(ge=MIN_SIZE, le=MAX_SIZE, multiple_of=8), WHOLE_FLOATS_AS_INT]
MAX_STEPS = 150
Steps = Annotated[int, Field(ge=1, le=MAX_STEPS), WHOLE_FLOATS_AS_INT]
GuidanceScale = Annotated[float, Field(ge=0, le=20)]
Seed = Annotated[int, Field(ge=0, le=MAX_SEED), WHOLE_FLOATS_AS_INT]
ImageCount = Annotated[int, Field(ge=1, le=8), WHOLE_FLOATS_AS_INT]
DEFAULT_STRENGTH = 0.8
CONTENT_TYPES: dict[str, str] = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}


WebhookEvent = Literal["completed", "started", "progress"]
# What happens to an image the safety checker flags, from the least strict to the most.
SafetyAction = Literal["flag", "blur", "block"]
SAFETY_ACTIONS: tuple[SafetyAction, ...] = ("flag", "blur", "block")
ModelName = Annotated[str, Field(min_length=1, max_length=200, pattern=r"^[\x21-\x7e]+$")]
# An image in a request: base64 (a `data:` URL too) or an http(s) URL the API fetches; the API
# caps its bytes and pixels (`T2I_MAX_INPUT_IMAGE_BYTES`, `T2I_MAX_INPUT_IMAGE_PIXELS`).
InputImage = Annotated[str, Field(min_length=1, max_length=20_000_000)]
# A request applies at most this many LoRA adapters at once.
MAX_LORAS = 4
# An adapter's name is its file's name in the registry, without `.safetensors`.
LoraName = Annotated[
    str, Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
]
LoraScale = Annotated[float, Field(ge=-2, le=2)]
ControlType = Annotated[str, Field(min_length=1, max_length=50, pattern=r"^[a-z0-9][a-z0-9_-]*$")]
ConditioningScale = Annotated[float, Field(ge=0, le=2)]


def strictest(*actions: SafetyAction | None) -> SafetyAction:
    """The strictest of the given actions (`flag` when none is given)."""
    return max((a for a in actions if a is not None), key=SAFETY_ACTIONS.index, default="flag")


class WebhookSpec(BaseModel):
    """Where to send a job's events; `completed` covers every terminal state."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    url: str = Field(
        min_length=1,
        max_length=2048,
        pattern=r"^[Hh][Tt][Tt][Pp][Ss]?://",
        description="http(s); its host must resolve to a public address unless allow-listed",
    )
    events: list[WebhookEvent] = Field(
        default=["completed"],
        min_length=1,
        max_length=3,
        json_schema_extra={"uniqueItems": True},
        description="the events to send, each at most once: `completed` (any terminal state), "
        "`started`, `progress`",
    )

    @field_validator("events")
    @classmethod
    def _distinct(cls, events: list[str]) -> list[str]:
        if len(set(events)) != len(events):
            raise ValueError("events must not repeat")
        return events


class LoraSpec(BaseModel):
    """One LoRA adapter from the operator's registry (`GET /v1/loras`) and how strongly it
    applies (0: not at all, 1: as trained)."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    name: LoraName = Field(description="one of `GET /v1/loras`")
    scale: LoraScale = Field(
        default=1.0, description="how strongly it applies: 0 not at all, 1 as trained"
    )


class ControlSpec(BaseModel):
    """ControlNet: an image whose structure (edges, depth, ...) the result follows."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    type: ControlType = Field(description="one of the control types of `GET /v1/models`")
    image: InputImage = Field(
        description="base64 (or a data: URL) or an https URL; resized to width x height. Once "
        "stored, the job shows its SHA-256"
    )
    conditioning_scale: ConditioningScale = Field(
        default=1.0, description="how strongly the result follows the control image"
    )
    preprocess: bool = Field(
        default=True,
        description="true: the image is a picture, turned into the control type's map on the "
        "worker (canny: its edges); false: the image already is that map",
    )


PreviewFormat = Literal["webp", "jpeg"]


class PreviewSpec(BaseModel):
    """Live previews: a small image of the render so far, every few steps, in the job's event
    stream (`preview` events), on `GET /v1/jobs/{id}` while it runs, and on A1111's progress
    route. Best effort: a preview a slow client or Redis cannot take in time is dropped."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    every_n_steps: Steps = Field(
        default=5, description="a preview after steps N, 2N, 3N... (the last when a multiple)"
    )
    format: PreviewFormat = Field(default="webp", description="`webp` or `jpeg`")
    max_size: Annotated[int, Field(ge=32, le=512), WHOLE_FLOATS_AS_INT] = Field(
        default=256, description="the preview's longest side in pixels"
    )


class GenerationRequest(BaseModel):
    """What a client asks for. The defaults are SD 1.5's usual ones (512x512, guidance 7.5), with
    DPM-Solver++ in 25 steps instead of PNDM in 50; a width or height not given is the default
    size of the named model's family (SDXL: 1024), and each side must be within that family's
    sizes. `width x height x num_images` may not exceed the service's pixel budget
    (`T2I_MAX_PIXELS_PER_JOB`)."""

    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        frozen=True,
        json_schema_extra={
            "examples": [
                {"prompt": "a lighthouse at dusk, oil painting", "seed": 42},
                {
                    "prompt": "a red kite over the sea",
                    "negative_prompt": "blurry",
                    "width": 768,
                    "height": 512,
                    "num_inference_steps": 30,
                    "guidance_scale": 6.5,
                    "scheduler": "euler_a",
                    "num_images": 2,
                    "output_format": "webp",
                },
            ]
        },
    )

    prompt: Prompt = Field(
        description="what to draw; not blank. Longer than CLIP's 77-token window is not "
        "truncated: it is encoded in 75-token chunks"
    )
    negative_prompt: NegativePrompt = Field(default="", description="what to steer away from")
    width: Dimension = Field(
        default=DEFAULT_FAMILY.default_size,
        description="image width in pixels, within the model's family's sizes (`GET /v1/models`);"
        " absent: the family's default (SD 1.5: 512, SDXL: 1024)",
    )
    height: Dimension = Field(
        default=DEFAULT_FAMILY.default_size,
        description="image height in pixels, within the model's family's sizes (`GET "
        "/v1/models`); absent: the family's default (SD 1.5: 512, SDXL: 1024)",
    )
    num_inference_steps: Steps = Field(default=25, description="denoising steps")
    guidance_scale: GuidanceScale = Field(
        default=7.5,
        description="classifier-free guidance: how closely the image follows the prompt",
    )
    scheduler: Scheduler = Field(default="dpmpp_2m", description="the sampler")
    seed: Seed | None = Field(default=None, description="absent: the server picks one")
    num_images: ImageCount = Field(default=1, description="image i gets seed + i")
    output_format: OutputFormat = Field(
        default="png",
        description="the images' file format; each carries its generation parameters",
    )
    webhook: WebhookSpec | None = Field(
        default=None, description="where to send the job's events, signed"
    )
    priority: Priority = Field(
        default="batch",
        description="`interactive` jobs of a key start before its `batch` jobs; a key may be "
        "limited to some priorities",
    )
    model: ModelName | None = Field(
        default=None, description="one of `GET /v1/models`; absent: the deployment's default"
    )
    safety_action: SafetyAction | None = Field(
        default=None,
        description="what happens to an image the safety checker flags: `flag` (stored, marked), "
        "`blur` (stored blurred, marked) or `block` (not stored); only ever stricter than the "
        "API key's and the deployment's action",
    )
    init_image: InputImage | None = Field(
        default=None,
        description="image-to-image: the starting image, base64 (or a data: URL) or an https "
        "URL; resized to width x height. Once stored, the job shows its SHA-256",
    )
    mask_image: InputImage | None = Field(
        default=None,
        description="inpainting, with `init_image`: white repaints, black keeps; the same size "
        "as `init_image`",
    )
    strength: Annotated[float, Field(gt=0, le=1)] | None = Field(
        default=None,
        description="with `init_image`: how far from it the result may move (1: all the way); "
        f"default {DEFAULT_STRENGTH}; strength x num_inference_steps must be at least 1",
    )

    loras: list[LoraSpec] = Field(
        default=[],
        max_length=MAX_LORAS,
        description="LoRA adapters applied to this job, each name at most once",
    )
    control: ControlSpec | None = Field(
        default=None, description="ControlNet conditioning; not with `init_image`"
    )
    preview: PreviewSpec | None = Field(
        default=None,
        description="live previews while the job renders (each of the job's images side by "
        "side); absent: none, and no cost",
    )

    @field_validator("loras")
    @classmethod
    def _distinct_loras(cls, loras: list[LoraSpec]) -> list[LoraSpec]:
        if len({lora.name for lora in loras}) != len(loras):
            raise ValueError("each LoRA adapter may be named once")
        return loras

    @model_validator(mode="after")
    def _image_inputs_belong_together(self) -> "GenerationRequest":
        if self.control is not None and self.init_image is not None:
            raise ValueError("control does not combine with init_image")
        if self.init_image is None:
            if self.mask_image is not None:
                raise ValueError("mask_image needs an init_image")
            if self.strength is not None:
                raise ValueError("strength applies only with an init_image")
        elif self.num_inference_steps * self.image_strength < 1:
            raise ValueError(
                "strength x num_inference_steps must be at least 1 (one denoising step)"
            )
        return self

    @property
    def image_strength(self) -> float:
        return DEFAULT_STRENGTH if self.strength is None else self.strength

    @field_validator("prompt")
    @classmethod
    def _not_blank(cls, prompt: str) -> str:
        if not prompt.strip():
            raise ValueError("prompt must not be blank")
        return prompt

    @property
    def pixels(self) -> int:
        return self.width * self.height * self.num_images

    def image_seeds(self) -> list[int]:
        """Seed of each image: consecutive from the job's seed, as popular SD UIs do."""
        if self.seed is None:
            raise ValueError("seed is resolved before rendering")
        return [(self.seed + index) % (MAX_SEED + 1) for index in range(self.num_images)]


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

ALLOWED_TRANSITIONS: dict[JobStatus, frozenset[JobStatus]] = {
    JobStatus.QUEUED: frozenset(
        {JobStatus.RUNNING, JobStatus.CANCELED, JobStatus.EXPIRED, JobStatus.FAILED}
    ),
    # Back to queued (a new attempt) when the worker that ran it was lost.
    JobStatus.RUNNING: frozenset(
        {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELED, JobStatus.QUEUED}
    ),
}


def can_transition(current: JobStatus, new: JobStatus) -> bool:
    return new in ALLOWED_TRANSITIONS.get(current, frozenset())


class JobErrorType(StrEnum):
    """Why a job failed."""

    RENDER_ERROR = "render_error"
    OUT_OF_MEMORY = "out_of_memory"
    # The image came out with NaN or infinite pixels (a numerical overflow in fp16).
    NUMERICAL_ERROR = "numerical_error"
    STORAGE_ERROR = "storage_error"
    # Every worker that took the job was lost (killed, hung or cut off) before it finished, or
    # its message never reached one, too many times.
    WORKER_LOST = "worker_lost"
    INTERNAL_ERROR = "internal_error"


class JobError(BaseModel):
    type: JobErrorType
    message: str


class ImageSafety(BaseModel):
    """What the safety checker made of one image."""

    checked: bool = Field(description="false only where the operator turned the checker off")
    flagged: bool = False
    action: SafetyAction | None = Field(
        default=None, description="for a flagged image: what was done to it"
    )
    reason: Literal["nsfw_content"] | None = None


class ImageProvenance(BaseModel):
    """The marks a stored image carries, saying where it came from (docs/provenance.md)."""

    c2pa_manifest: bool = Field(
        description="signed C2PA Content Credentials are embedded in the file"
    )
    development_signer: bool = Field(
        default=False,
        description="the manifest is signed with a development certificate, not the operator's",
    )
    watermark: bool = Field(
        description="an invisible watermark naming this job and image is in the pixels"
    )


class StoredImage(BaseModel):
    """An image as the worker records it: a storage key, never a URL; no key when filtered."""

    key: str | None
    width: int
    height: int
    seed: int
    content_type: str
    safety: ImageSafety | None = None
    provenance: ImageProvenance | None = None

    @property
    def filtered(self) -> bool:
        return self.key is None


class ImageOut(BaseModel):
    url: str | None = Field(description="null when the image was filtered (not stored)")
    width: int
    height: int
    seed: int
    content_type: str
    filtered: bool = Field(default=False, description="blocked by the safety checker")
    safety: ImageSafety | None = None
    provenance: ImageProvenance | None = Field(
        default=None, description="the marks applied to the stored image; null when filtered"
    )


class Progress(BaseModel):
    step: int
    total: int
    eta_s: float | None = None


class PreviewOut(BaseModel):
    """The latest live preview of a running job."""

    step: int
    total: int
    width: int
    height: int
    image: str = Field(description="a data: URL (`data:image/webp;base64,...`)")


class Timings(BaseModel):
    queued_s: float | None = Field(
        default=None, description="from submission until a GPU batch admitted the job"
    )
    render_s: float | None = Field(default=None, description="the pipeline call the job rode in")
    upload_s: float | None = Field(default=None, description="encoding and storing the images")


class BatchInfo(BaseModel):
    """The pipeline call a job's images came from: several jobs may share one."""

    id: str
    images: int


class JobRecord(BaseModel):
    """A job as the job store holds it."""

    id: str
    owner: str | None = None
    # The worker holding the current attempt (reserved or rendering); every write it makes is
    # fenced on (worker, attempt), so a worker that lost the job can no longer change it.
    worker: str | None = None
    attempt: int = 1
    # Attempts lost with their worker or their message; past the cap the job fails as
    # `worker_lost`.
    retries: int = 0
    status: JobStatus
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    request: GenerationRequest
    progress: Progress | None = None
    images: list[StoredImage] = Field(default_factory=list)
    error: JobError | None = None
    timings: Timings = Field(default_factory=Timings)
    batch: BatchInfo | None = None
    # False where the operator exempted the job's API key from the invisible watermark.
    watermark: bool = True

    def waited_longer_than(self, seconds: float, now: datetime) -> bool:
        """Whether a job still queued at `now` has outwaited the queue timeout."""
        return (now - self.created_at).total_seconds() > seconds


class JobOut(BaseModel):
    """A job as `GET /v1/jobs/{id}` returns it."""

    id: str
    status: JobStatus
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    request: GenerationRequest
    attempt: int = Field(
        default=1, description="1, more once the job went back to the queue after a lost worker"
    )
    queue_position: int | None = Field(
        default=None, description="queued jobs ahead of this one (0: it starts next)"
    )
    eta_s: float | None = Field(
        default=None, description="estimated seconds until the job finishes, while not terminal"
    )
    progress: Progress | None = None
    preview: PreviewOut | None = Field(
        default=None, description="while running, with `preview` asked: the latest preview"
    )
    images: list[ImageOut]
    error: JobError | None
    timings: Timings
    batch: BatchInfo | None = None


class KeyUsage(BaseModel):
    """The calling key's jobs now, and its share of the worker pool."""

    queued: int = Field(description="its jobs waiting for a worker")
    running: int = Field(description="its jobs rendering")
    weight: int = Field(description="its share of the pool against other keys with queued jobs")
    max_running: int | None = Field(description="the most jobs it may have running; null: no cap")
    priorities: list[Priority] = Field(description="the priorities its jobs may ask for")


class JobList(BaseModel):
    data: list[JobOut]
    next_cursor: str | None = Field(
        description="pass as `cursor` for the next page; null at the end"
    )
    key: KeyUsage
