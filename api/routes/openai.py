"""OpenAI's Images API, `POST /v1/images/generations`, `edits` and `variations`: a job through the
one job path, answered once it has finished, in OpenAI's shapes (errors included), so the `openai`
SDKs work unchanged."""

import base64
import io
import math
import re
from typing import Annotated, Any, Literal, TypeVar

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_core import PydanticCustomError
from starlette.datastructures import FormData, UploadFile

from api.compat import DialectRoute, Finished, generate
from api.deps import CallerDep, Services, ServicesDep
from api.images import open_upload
from api.openapi import RATE_LIMIT_HEADERS, error_responses
from shared.apikeys import ApiKey
from shared.errors import ErrorType, ServiceError
from shared.families import ModelFamily
from shared.model_families import model_target
from shared.queue import live_workers
from shared.schema import (
    WHOLE_FLOATS_AS_INT,
    GenerationRequest,
    GuidanceScale,
    ImageCount,
    NegativePrompt,
    OutputFormat,
    Prompt,
    Scheduler,
    Seed,
    Steps,
)
from shared.settings import ApiSettings

# Any `WIDTHxHEIGHT` (1 to 99999 pixels a side) or `auto`; `fitted_size` maps it to a size the
# workers render.
SIZE_PATTERN = r"^(auto|[1-9][0-9]{0,4}x[1-9][0-9]{0,4})$"
SIZE_RULE = (
    "`WIDTHxHEIGHT` in pixels, any sides, or `auto`. A size the model cannot render is mapped to "
    "the nearest one it can by the sizes of its family (`GET /v1/models`; SD 1.5: 256 to 1024, "
    "SDXL: 512 to 2048), keeping the aspect ratio: scaled down until the longer side is at most "
    "the family's largest and width x height x n fits the pixel budget "
    "(`T2I_MAX_PIXELS_PER_JOB`), or up until the shorter side is the family's smallest, then each "
    "side rounded down to a multiple of 8 and kept within the family's sizes (e.g. on SD 1.5, "
    "1536x1024 -> 1024x680). The answer's `size` is the size rendered"
)
DEFAULT_SIZE_RULE = "the model's family's default size (SD 1.5: 512x512, SDXL: 1024x1024)"
# `model` picks the served model it names; any other name (dall-e-2, gpt-image-1...) renders with
# the deployment's default.
MODEL_RULE = (
    "a model a live worker serves (`GET /v1/models`) renders the job; any other name, OpenAI's "
    "`dall-e-2`, `dall-e-3`, `gpt-image-1` included, renders with the deployment's default model"
)
IGNORED_FIELDS = (
    "quality",
    "style",
    "background",
    "moderation",
    "output_compression",
    "partial_images",
    "user",
    "safety_identifier",
)
_IGNORED = "accepted and ignored"
# Our request's field names as OpenAI's `param` names them.
_PARAMS = {"num_images": "n", "width": "size", "height": "size"}


class ImageGenerationRequest(BaseModel):
    """OpenAI's image generation request, with Stable Diffusion's own settings as extra fields."""

    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        json_schema_extra={
            "examples": [
                {"prompt": "a lighthouse at dusk", "n": 1, "size": "512x512"},
                {
                    "prompt": "a red kite over the sea",
                    "size": "768x512",
                    "response_format": "b64_json",
                    "output_format": "webp",
                    "negative_prompt": "blurry",
                    "num_inference_steps": 30,
                    "scheduler": "euler_a",
                    "seed": 42,
                },
            ]
        },
    )

    prompt: Prompt
    n: ImageCount | None = Field(default=None, description="how many images (default 1)")
    size: str | None = Field(
        default=None,
        json_schema_extra={"pattern": SIZE_PATTERN},
        description=f"{SIZE_RULE}; `auto` or absent: {DEFAULT_SIZE_RULE}",
    )
    response_format: Literal["url", "b64_json"] | None = Field(
        default=None,
        description="`url` (default): signed download URLs; `b64_json`: the image files, base64",
    )
    output_format: OutputFormat | None = Field(default=None, description="default png")
    model: str | None = Field(default=None, description=MODEL_RULE)
    quality: str | None = Field(default=None, description=_IGNORED)
    style: str | None = Field(default=None, description=_IGNORED)
    background: str | None = Field(default=None, description=f"{_IGNORED}: images are opaque")
    moderation: str | None = Field(default=None, description=_IGNORED)
    output_compression: Annotated[int, Field(ge=0, le=100), WHOLE_FLOATS_AS_INT] | None = Field(
        default=None, description=_IGNORED
    )
    partial_images: Annotated[int, Field(ge=0, le=3), WHOLE_FLOATS_AS_INT] | None = Field(
        default=None, description=_IGNORED
    )
    stream: Literal[False] | None = Field(
        default=None, description="only `false`: the answer comes once the images are ready"
    )
    user: str | None = Field(default=None, description=_IGNORED)
    safety_identifier: str | None = Field(default=None, description=_IGNORED)
    negative_prompt: NegativePrompt = ""
    num_inference_steps: Steps = 25
    guidance_scale: GuidanceScale = 7.5
    scheduler: Scheduler = "dpmpp_2m"
    seed: Seed | None = Field(default=None, description="absent: the server picks one")

    @field_validator("size")
    @classmethod
    def _size(cls, size: str | None) -> str | None:
        return checked_size(size)

    @field_validator("stream", mode="before")
    @classmethod
    def _only_false(cls, stream: object) -> object:
        # Literal[False] would take 0, which equals False.
        if stream is not None and stream is not False:
            raise ValueError("only false: streamed answers are not offered")
        return stream

    def generation(self, budget: int, model: str | None, family: ModelFamily) -> GenerationRequest:
        if self.size in (None, "auto"):
            size = (family.default_size, family.default_size)
        else:
            size = parsed_size(self.size)
        width, height = fitted_size(size, self.n or 1, budget, family)
        return GenerationRequest(
            prompt=self.prompt,
            negative_prompt=self.negative_prompt,
            width=width,
            height=height,
            num_inference_steps=self.num_inference_steps,
            guidance_scale=self.guidance_scale,
            scheduler=self.scheduler,
            seed=self.seed,
            num_images=self.n or 1,
            output_format=self.output_format or "png",
            model=model,
        )


def checked_size(size: str | None) -> str | None:
    """The size as sent, or a human message (no regular expression) when it is not one."""
    if size is not None and not re.fullmatch(SIZE_PATTERN, size):
        raise PydanticCustomError(
            "invalid_size",
            "'{size}' is not a size: send `auto` or WIDTHxHEIGHT in pixels, e.g. 1024x1024 "
            "(each side 1 to 99999; any size is mapped to the nearest one rendered)",
            {"size": size[:40]},
        )
    return size


def parsed_size(size: str) -> tuple[int, int]:
    width, height = size.split("x")
    return int(width), int(height)


def fitted_size(size: tuple[int, int], n: int, budget: int, family: ModelFamily) -> tuple[int, int]:
    """The nearest size a model of `family` renders (see SIZE_RULE)."""
    width, height = size
    smallest, largest, step = family.min_size, family.max_size, family.size_multiple
    scale = min(1.0, largest / max(width, height), math.sqrt(budget / n / (width * height)))
    scale = max(scale, smallest / min(width, height))

    def side(pixels: int) -> int:
        # The epsilon keeps a side scaled to exactly 1024 from flooring to 1016.
        rounded = math.floor(pixels * scale / step + 1e-9) * step
        return min(largest, max(smallest, rounded))

    return side(width), side(height)


async def served_model(services: Services, name: str | None) -> tuple[str | None, ModelFamily]:
    """The model `name` names when it is served (see MODEL_RULE), else None: the default; and
    the family of the model that renders."""
    return await run_in_threadpool(_served_model, services, name)


def _served_model(services: Services, name: str | None) -> tuple[str | None, ModelFamily]:
    workers = live_workers(services.redis, services.core.worker_heartbeat_max_age_s)
    default = services.core.deployment_model
    served = name == default or name in {worker.model for worker in workers}
    chosen = name if served else None
    return chosen, model_target(services.redis, chosen or default, workers).family


class GeneratedImage(BaseModel):
    url: str | None = Field(default=None, description="with `response_format=url`")
    b64_json: str | None = Field(default=None, description="with `response_format=b64_json`")


class ImagesResponse(BaseModel):
    created: int = Field(description="when the job was submitted, in Unix seconds")
    data: list[GeneratedImage]
    output_format: OutputFormat
    size: str


class OpenAIErrorBody(BaseModel):
    message: str
    type: str = Field(description="`invalid_request_error`, or `server_error` for a 5xx")
    param: str | None = Field(description="the request field at fault, if one is")
    code: str | None = Field(description="the service's error type, e.g. `invalid_api_key`")


class OpenAIError(BaseModel):
    error: OpenAIErrorBody


def _param(details: Any) -> str | None:
    if not isinstance(details, list) or not details or not isinstance(details[0], dict):
        return None
    fields = [part for part in details[0].get("loc", []) if isinstance(part, str)]
    if not fields or fields[-1] == "body":
        return None
    return _PARAMS.get(fields[-1], fields[-1])


def openai_error(error: ServiceError) -> JSONResponse:
    """The error in OpenAI's shape; OpenAI answers an invalid request with 400, not 422."""
    invalid = error.error_type is ErrorType.VALIDATION_ERROR
    status = 400 if invalid else error.status_code
    codes = {
        ErrorType.UNAUTHORIZED: "invalid_api_key",
        ErrorType.RATE_LIMITED: "rate_limit_exceeded",
    }
    body = OpenAIErrorBody(
        message=error.message,
        type="server_error" if status >= 500 else "invalid_request_error",
        param=_param(error.details) if invalid else None,
        code=codes.get(error.error_type, error.error_type.value),
    )
    return JSONResponse(
        OpenAIError(error=body).model_dump(mode="json"), status_code=status, headers=error.headers
    )


class OpenAIRoute(DialectRoute):
    render_error = staticmethod(openai_error)


router = APIRouter(route_class=OpenAIRoute, tags=["openai"])


@router.post(
    "/v1/images/generations",
    response_model=ImagesResponse,
    responses={
        200: {"headers": RATE_LIMIT_HEADERS},
        **error_responses(400, 401, 409, 413, 429, 503, 504, model=OpenAIError),
    },
    summary="Generate images (OpenAI Images API)",
    description=(
        "OpenAI's `images.generate`, with the API key as the bearer token. The job goes through "
        "the same queue, batching and limits as `POST /v1/jobs`, and the answer comes when it has "
        f"finished (at most `T2I_SYNC_WAIT_S`, then it is canceled: 504). Ignored fields: "
        f"{', '.join(f'`{name}`' for name in IGNORED_FIELDS)}. Errors come in OpenAI's shape, "
        "with 400 for an invalid request."
    ),
)
async def create_image(
    body: ImageGenerationRequest,
    services: ServicesDep,
    caller: CallerDep,
    request: Request,
) -> JSONResponse:
    model, family = await served_model(services, body.model)
    generation = body.generation(services.api.max_pixels_per_job, model, family)
    return await _render(services, request, caller, generation, body.response_format)


async def _render(
    services: Services,
    request: Request,
    caller: ApiKey,
    generation: GenerationRequest,
    response_format: str | None,
) -> JSONResponse:
    """The job rendered, answered as OpenAI's images response."""
    finished = await generate(services, request, caller, generation)
    return await _answer(services, request, finished, generation, response_format)


async def _answer(
    services: Services,
    request: Request,
    finished: Finished,
    generation: GenerationRequest,
    response_format: str | None,
) -> JSONResponse:
    if response_format == "b64_json":
        files = await run_in_threadpool(finished.images, services)
        data = [GeneratedImage(b64_json=base64.b64encode(file).decode()) for file in files]
    else:
        base_url = services.base_url(request)
        data = [
            GeneratedImage(url=services.storage.download_url(image.key, base_url))
            for image in finished.stored_images()
            if image.key is not None
        ]
    answer = ImagesResponse(
        created=int(finished.record.created_at.timestamp()),
        data=data,
        output_format=generation.output_format,
        size=f"{generation.width}x{generation.height}",
    )
    return JSONResponse(
        answer.model_dump(mode="json", exclude_none=True), headers=finished.rate_limit.headers()
    )


# Edits and variations: multipart uploads, as the `openai` SDK sends them.
_MULTIPART = "multipart/form-data"
_FILE_PARTS = ("image", "image[]", "mask")
# OpenAI's upload fields that change nothing here (`stream` is checked: only false).
IGNORED_UPLOAD_FIELDS = (
    "background",
    "complexity",
    "frame_count",
    "frame_duration_ms",
    "input_fidelity",
    "markup",
    "moderation",
    "output_compression",
    "partial_images",
    "quality",
    "safety_identifier",
    "style",
    "svg",
    "user",
)
EDIT_STRENGTH = 1.0
VARIATION_STRENGTH = 0.6
VARIATION_PROMPT = "an image"


_Fields = TypeVar("_Fields", bound=BaseModel)


class _UploadFields(BaseModel):
    """An upload's text fields: OpenAI's and Stable Diffusion's own, from strings."""

    model_config = ConfigDict(extra="forbid")

    n: ImageCount | None = None
    size: str | None = None
    response_format: Literal["url", "b64_json"] | None = None
    output_format: OutputFormat | None = None
    model: str | None = None
    stream: Literal["false", "False"] | None = None
    negative_prompt: NegativePrompt = ""
    num_inference_steps: Steps = 25
    guidance_scale: GuidanceScale = 7.5
    scheduler: Scheduler = "dpmpp_2m"
    seed: Seed | None = None
    strength: Annotated[float, Field(gt=0, le=1)] | None = None

    @field_validator("size")
    @classmethod
    def _size(cls, size: str | None) -> str | None:
        return checked_size(size)


class _EditFields(_UploadFields):
    prompt: Prompt


class _VariationFields(_UploadFields):
    prompt: Prompt = VARIATION_PROMPT


def _invalid(field: str, message: str, kind: str = "value_error") -> ServiceError:
    return ServiceError(
        ErrorType.VALIDATION_ERROR,
        f"{field}: {message}",
        [{"loc": ["body", field], "msg": message, "type": kind}],
    )


def _validated(model: type[_Fields], values: dict[str, Any]) -> _Fields:
    """The fields validated, an error naming the field OpenAI's way."""
    try:
        return model.model_validate(values)
    except ValidationError as exc:
        errors = [{**error, "loc": ("body", *error["loc"])} for error in exc.errors()]
        raise RequestValidationError(errors) from exc


async def _upload(request: Request) -> FormData:
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != _MULTIPART:
        raise ServiceError(
            ErrorType.VALIDATION_ERROR,
            f"send the request as {_MULTIPART} (the `openai` SDK does), not "
            f"{content_type or 'no content type'}",
        )
    return await request.form(max_files=20, max_fields=64)


async def _file(form: FormData, field: str, api: ApiSettings) -> bytes | None:
    """The file part's bytes (`image` may come as several `image[]`: the first is taken)."""
    parts = form.getlist(field) or (form.getlist(f"{field}[]") if field == "image" else [])
    if not parts:
        return None
    part = parts[0]
    if not isinstance(part, UploadFile):
        raise _invalid(field, f"the {field} must be a file part, not a text field")
    return await part.read(api.max_input_image_bytes + 1)


async def _required_image(form: FormData, api: ApiSettings) -> bytes:
    image = await _file(form, "image", api)
    if image is None:
        raise _invalid("image", "send the image as the multipart file part `image`", "missing")
    return image


def _text_fields(form: FormData) -> dict[str, Any]:
    return {
        name: value
        for name, value in form.items()
        if name not in _FILE_PARTS and name not in IGNORED_UPLOAD_FIELDS
    }


def _opened(field: str, data: bytes, api: ApiSettings) -> tuple[Image.Image, Image.Image | None]:
    """The upload in RGB (checked like any input image) and its alpha channel, if it has one."""
    try:
        rgb = open_upload(data, api)
    except ServiceError as exc:
        if field == "image":
            raise
        message = exc.message.removeprefix("image: ")
        raise _invalid(field, message) from exc
    with Image.open(io.BytesIO(data)) as raw:
        has_alpha = raw.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in raw.info
        alpha = raw.convert("RGBA").getchannel("A") if has_alpha else None
    return rgb, alpha


def _png_data_url(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _edit_inputs(
    image: bytes, mask: bytes | None, api: ApiSettings
) -> tuple[str, str, tuple[int, int]]:
    """The init image and our mask (white repaints) as data URLs, and the image's size. OpenAI's
    mask marks what to edit with fully transparent pixels; without a mask, the image's own."""
    rgb, alpha = _opened("image", image, api)
    if mask is not None:
        _, alpha = _opened("mask", mask, api)
        if alpha is None:
            raise _invalid(
                "mask",
                "the mask has no alpha channel: send a PNG whose fully transparent pixels mark "
                "where to edit",
            )
        if alpha.size != rgb.size:
            raise _invalid(
                "mask",
                f"the mask is {alpha.width}x{alpha.height}, the image {rgb.width}x{rgb.height}; "
                "they must be the same size",
            )
        field = "mask"
    elif alpha is None:
        raise _invalid(
            "mask",
            "send a mask (a PNG whose fully transparent pixels mark where to edit), or an image "
            "with transparent pixels: this image has no alpha channel",
            "missing",
        )
    else:
        field = "image"
    repaint = alpha.point(lambda level: 255 if level == 0 else 0)
    if repaint.getbbox() is None:
        raise _invalid(field, "no pixel is fully transparent, so there is nothing to edit")
    return _png_data_url(rgb), _png_data_url(repaint), rgb.size


def _variation_input(image: bytes, api: ApiSettings) -> tuple[str, tuple[int, int]]:
    rgb, _ = _opened("image", image, api)
    return _png_data_url(rgb), rgb.size


async def _image_job(
    services: Services,
    request: Request,
    caller: ApiKey,
    fields: _UploadFields,
    prompt: str,
    images: tuple[str, str | None, tuple[int, int]],
    strength: float,
) -> JSONResponse:
    init, mask, image_size = images
    n = fields.n or 1
    size = parsed_size(fields.size) if fields.size not in (None, "auto") else image_size
    model, family = await served_model(services, fields.model)
    width, height = fitted_size(size, n, services.api.max_pixels_per_job, family)
    generation = _validated(
        GenerationRequest,
        {
            "prompt": prompt,
            "negative_prompt": fields.negative_prompt,
            "width": width,
            "height": height,
            "num_inference_steps": fields.num_inference_steps,
            "guidance_scale": fields.guidance_scale,
            "scheduler": fields.scheduler,
            "seed": fields.seed,
            "num_images": n,
            "output_format": fields.output_format or "png",
            "model": model,
            "init_image": init,
            "mask_image": mask,
            "strength": fields.strength or strength,
        },
    )
    return await _render(services, request, caller, generation, fields.response_format)


_UPLOAD_ERRORS = error_responses(400, 401, 409, 413, 429, 503, 504, model=OpenAIError)
_UPLOAD_FIELDS = (
    "`n`, `size` (as for generations; absent or `auto`: the image's own size, mapped the same "
    "way), `response_format`, `output_format`, `model`, and Stable Diffusion's `negative_prompt`, "
    "`num_inference_steps`, `guidance_scale`, `scheduler`, `seed` and `strength`"
)


@router.post(
    "/v1/images/edits",
    # Not in the OpenAPI document: a generated multipart body cannot carry a real image.
    include_in_schema=False,
    response_model=ImagesResponse,
    responses={200: {"headers": RATE_LIMIT_HEADERS}, **_UPLOAD_ERRORS},
    summary="Edit an image: inpainting (OpenAI Images API)",
    description=(
        "OpenAI's `images.edit`, multipart: `image` (or several `image[]`: the first is used), "
        "`mask` (a PNG whose fully transparent pixels mark where to edit; absent: the image's "
        f"own transparent pixels), `prompt`, {_UPLOAD_FIELDS}. Inpainting at strength "
        f"{EDIT_STRENGTH:g} unless `strength` says otherwise."
    ),
)
async def edit_image(services: ServicesDep, caller: CallerDep, request: Request) -> JSONResponse:
    form = await _upload(request)
    fields = _validated(_EditFields, _text_fields(form))
    image = await _required_image(form, services.api)
    mask = await _file(form, "mask", services.api)
    inputs = await run_in_threadpool(_edit_inputs, image, mask, services.api)
    return await _image_job(services, request, caller, fields, fields.prompt, inputs, EDIT_STRENGTH)


@router.post(
    "/v1/images/variations",
    include_in_schema=False,
    response_model=ImagesResponse,
    responses={200: {"headers": RATE_LIMIT_HEADERS}, **_UPLOAD_ERRORS},
    summary="Variations of an image (OpenAI Images API)",
    description=(
        f"OpenAI's `images.create_variation`, multipart: `image`, {_UPLOAD_FIELDS}. "
        f"Image-to-image at strength {VARIATION_STRENGTH:g} with the prompt "
        f"{VARIATION_PROMPT!r}; `prompt` and `strength` may say otherwise."
    ),
)
async def create_variation(
    services: ServicesDep, caller: CallerDep, request: Request
) -> JSONResponse:
    form = await _upload(request)
    fields = _validated(_VariationFields, _text_fields(form))
    image = await _required_image(form, services.api)
    init, size = await run_in_threadpool(_variation_input, image, services.api)
    return await _image_job(
        services, request, caller, fields, fields.prompt, (init, None, size), VARIATION_STRENGTH
    )
