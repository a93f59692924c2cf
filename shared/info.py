"""What the service tells about itself: its version, request limits and the live workers."""

from importlib.metadata import version
from typing import Self, get_args

from pydantic import BaseModel, Field

from shared.families import DEFAULT_FAMILY, ModelFamily, ModelFamilyName
from shared.schema import GenerationRequest, Scheduler

SERVICE_NAME = "txt2img-service"
SERVICE_VERSION = version(SERVICE_NAME)
SCHEDULERS: list[str] = list(get_args(Scheduler))
_REQUEST_FIELDS = GenerationRequest.model_json_schema()["properties"]


class WorkerInfo(BaseModel):
    """A render worker as its heartbeat describes it."""

    name: str
    model: str
    family: ModelFamilyName = Field(
        default=DEFAULT_FAMILY.name, description="the model family of the weights it loaded"
    )
    cross_attention_dim: int | None = Field(
        default=None,
        description="the text features its UNet's cross-attention takes (a LoRA adapter's "
        "cross-attention layers must take as many)",
    )
    queue: str | None = Field(default=None, description="the broker queue it reads")
    device: str
    max_batch_images: int
    levers: dict[str, bool | int | str | None] = Field(
        description="speed levers: whether each is on, or its setting where it takes one "
        "(`deepcache_interval`, `unet_quant`: null when off)"
    )
    control_types: list[str] = Field(default=[], description="the ControlNets it has loaded")
    dtypes: dict[str, str] = Field(
        default={},
        description="the dtype each of its modules holds now (unet, vae, text_encoder, "
        "controlnet:<type>, safety_checker), as loaded (T2I_DTYPE)",
    )
    recompiles: int = Field(
        default=0, description="UNet graphs compiled since its warm-up ended: 0 when healthy"
    )
    version: str
    last_seen_s: float | None = Field(default=None, description="seconds since its last heartbeat")


class Bounds(BaseModel):
    minimum: float
    maximum: float
    multiple_of: int | None = None


class ServedModel(BaseModel):
    """A model and what a request may ask of it, by the family of its weights."""

    id: str = Field(description="what a request's `model` names")
    family: ModelFamilyName = Field(
        description="`sd15` or `sdxl`: what its live workers say, else what its workers said "
        "last, else `sd15`"
    )
    default_width: int = Field(description="a request's width when it gives none")
    default_height: int = Field(description="a request's height when it gives none")
    width: Bounds = Field(description="the widths a request may ask of it")
    height: Bounds = Field(description="the heights a request may ask of it")

    @classmethod
    def of(cls, model: str, family: ModelFamily, **fields: object) -> "Self":
        sizes = Bounds(
            minimum=family.min_size, maximum=family.max_size, multiple_of=family.size_multiple
        )
        return cls.model_validate(
            {
                "id": model,
                "family": family.name,
                "default_width": family.default_size,
                "default_height": family.default_size,
                "width": sizes,
                "height": sizes,
                **fields,
            }
        )


class ModelInfo(ServedModel):
    """A model as `GET /v1/models` lists it."""

    default: bool = Field(description="what a request that names no model gets")
    workers: int = Field(description="live workers serving it")
    queued: int = Field(description="jobs of the model that no worker has started")
    control_types: list[str] = Field(
        description="what a request's `control.type` may name: the ControlNets its live workers "
        "have loaded"
    )


class ModelList(BaseModel):
    data: list[ModelInfo]


class QueueBacklog(BaseModel):
    """One model's queue as the worker autoscaler reads it."""

    model: str = Field(description="the model whose jobs the queue holds")
    default: bool = Field(description="what a request that names no model gets")
    queued: int = Field(
        description="jobs no worker has started: waiting for their key's turn, or sent to a worker"
    )
    running: int = Field(description="jobs a worker has started and not finished")
    jobs: int = Field(description="queued + running: what the workers of the model scale on")
    workers: int = Field(description="live workers serving the model")


class Backlog(BaseModel):
    """What `GET /backlog` returns."""

    queues: dict[str, QueueBacklog] = Field(
        description="by queue: T2I_QUEUE_NAME for the default model, `<T2I_QUEUE_NAME>@<model>` "
        "for another"
    )


class RequestLimits(BaseModel):
    prompt_max_chars: int
    width: Bounds = Field(
        description="any family's widths; each model's own are in `served_models` and "
        "`GET /v1/models`"
    )
    height: Bounds = Field(
        description="any family's heights; each model's own are in `served_models` and "
        "`GET /v1/models`"
    )
    num_inference_steps: Bounds
    guidance_scale: Bounds
    num_images: Bounds
    max_pixels_per_job: int = Field(description="cap on width x height x num_images")


class ServiceInfo(BaseModel):
    """What `GET /info` returns."""

    version: str
    models: list[str] = Field(description="the models the live workers serve")
    served_models: list[ServedModel] = Field(
        description="each model of `models`, with its family and the sizes a request may ask of it"
    )
    schedulers: list[str]
    limits: RequestLimits
    workers: list[WorkerInfo]


def _bounds(field: str) -> Bounds:
    schema = _REQUEST_FIELDS[field]
    return Bounds(
        minimum=schema["minimum"], maximum=schema["maximum"], multiple_of=schema.get("multipleOf")
    )


def request_limits(max_pixels_per_job: int) -> RequestLimits:
    """The request's bounds, read from the request schema itself."""
    return RequestLimits(
        prompt_max_chars=_REQUEST_FIELDS["prompt"]["maxLength"],
        width=_bounds("width"),
        height=_bounds("height"),
        num_inference_steps=_bounds("num_inference_steps"),
        guidance_scale=_bounds("guidance_scale"),
        num_images=_bounds("num_images"),
        max_pixels_per_job=max_pixels_per_job,
    )
