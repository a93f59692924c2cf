"""OpenAI's Images API, `POST /v1/images/generations`: a job through the one job path, answered
once it has finished, in OpenAI's shapes (errors included), so the `openai` SDKs work unchanged."""

import base64
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator

from api.compat import DialectRoute, generate
from api.deps import CallerDep, ServicesDep
from api.openapi import RATE_LIMIT_HEADERS, error_responses
from shared.errors import ErrorType, ServiceError
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

_DIMENSIONS = "|".join(str(pixels) for pixels in range(256, 1025, 64))
SIZE_PATTERN = rf"^(auto|({_DIMENSIONS})x({_DIMENSIONS}))$"
DEFAULT_SIZE = "512x512"
IGNORED_FIELDS = (
    "model",
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
        pattern=SIZE_PATTERN,
        description=f"`WIDTHxHEIGHT`, each a multiple of 64 from 256 to 1024; `auto` or absent: "
        f"{DEFAULT_SIZE}",
    )
    response_format: Literal["url", "b64_json"] | None = Field(
        default=None,
        description="`url` (default): signed download URLs; `b64_json`: the image files, base64",
    )
    output_format: OutputFormat | None = Field(default=None, description="default png")
    model: str | None = Field(default=None, description=f"{_IGNORED}: the workers' model renders")
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

    @field_validator("stream", mode="before")
    @classmethod
    def _only_false(cls, stream: object) -> object:
        # Literal[False] would take 0, which equals False.
        if stream is not None and stream is not False:
            raise ValueError("only false: streamed answers are not offered")
        return stream

    def generation(self) -> GenerationRequest:
        size = self.size if self.size not in (None, "auto") else DEFAULT_SIZE
        width, height = (int(pixels) for pixels in size.split("x"))
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
        )


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
    generation = body.generation()
    finished = await generate(services, request, caller, generation)
    if body.response_format == "b64_json":
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
