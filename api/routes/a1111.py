"""AUTOMATIC1111's web UI API, `/sdapi/v1/*`, over the one job path: what its clients (Open WebUI,
SillyTavern, scripts and bots) call, answered in its shapes."""

import base64
import json
import os
from functools import partial
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.routing import Match

from api.compat import DialectRoute, Finished, Tracking, generate
from api.deps import BearerOrBasicCallerDep, Services, ServicesDep
from api.images import decode_upload
from api.openapi import IMAGE_BODY_EXAMPLES, RATE_LIMIT_HEADERS, enum_var_names, error_responses
from api.routes.jobs import cancel
from shared import a1111_options
from shared.apikeys import ApiKey
from shared.errors import ErrorType, ServiceError
from shared.infotext import SAMPLER_NAMES, parameters_text
from shared.lora_tags import split_lora_tags
from shared.loras import LORA_SUFFIX, LoraRegistry
from shared.png_info import parse_parameters, read_image_info
from shared.queue import live_models
from shared.schema import (
    MAX_SEED,
    WHOLE_FLOATS_AS_INT,
    Dimension,
    GenerationRequest,
    GuidanceScale,
    InputImage,
    JobStatus,
    LoraSpec,
    NegativePrompt,
    PreviewSpec,
    Prompt,
    Scheduler,
    Steps,
)

# A1111's other names for each sampler, as its clients may send them.
_ALIASES: dict[Scheduler, tuple[str, ...]] = {
    "dpmpp_2m": ("k_dpmpp_2m",),
    "dpmpp_2m_karras": ("k_dpmpp_2m_ka",),
    "euler": ("k_euler",),
    "euler_a": ("k_euler_a",),
    "ddim": ("ddim",),
    "pndm": ("PLMS", "plms"),
    "lms": ("k_lms",),
    "unipc": ("unipc",),
}
SCHEDULER_BY_SAMPLER: dict[str, Scheduler] = {
    name: scheduler
    for scheduler, label in SAMPLER_NAMES.items()
    for name in (label, *_ALIASES[scheduler])
}
SamplerName = Annotated[
    Literal[tuple(SCHEDULER_BY_SAMPLER)],  # type: ignore[valid-type]
    Field(json_schema_extra=enum_var_names(list(SCHEDULER_BY_SAMPLER))),
]
_SCHEDULES = ("automatic", "Automatic", "karras", "Karras")
ScheduleName = Annotated[
    Literal[_SCHEDULES], Field(json_schema_extra=enum_var_names(_SCHEDULES))  # type: ignore[valid-type]
]
DEFAULT_SAMPLER = "Euler"
MAX_IMAGES = 8
ImagesPerCall = Annotated[int, Field(ge=1, le=MAX_IMAGES), WHOLE_FLOATS_AS_INT]
# How many of a key's newest jobs /progress looks through for the one that is rendering.
_PROGRESS_WINDOW = 50
_NOT_SUPPORTED = (
    "enable_hr and its hr_* fields, restore_faces, tiling, styles, subseed and its strength, "
    "override_settings other than sd_model_checkpoint, script_name and script_args, "
    "alwayson_scripts, save_images"
)


class Txt2ImgRequest(BaseModel):
    """A1111's txt2img request. The fields below are used; any other field A1111 defines is
    accepted and ignored (the route says which), as A1111 ignores fields it does not know."""

    model_config = ConfigDict(
        extra="ignore",
        strict=True,
        json_schema_extra={
            "examples": [
                {"prompt": "a lighthouse at dusk", "steps": 20, "sampler_name": "Euler a"},
                {
                    "prompt": "a red kite over the sea",
                    "negative_prompt": "blurry",
                    "seed": 42,
                    "sampler_name": "DPM++ 2M",
                    "scheduler": "Karras",
                    "batch_size": 2,
                    "n_iter": 2,
                    "steps": 25,
                    "cfg_scale": 6.5,
                    "width": 768,
                    "height": 512,
                },
            ]
        },
    )

    prompt: Prompt
    negative_prompt: NegativePrompt = ""
    seed: Annotated[int, Field(ge=-1, le=MAX_SEED), WHOLE_FLOATS_AS_INT] = Field(
        default=-1, description="-1: a random seed"
    )
    sampler_name: SamplerName | None = Field(default=None, description="default Euler")
    sampler_index: SamplerName | None = Field(
        default=None, description="the older name of `sampler_name`"
    )
    scheduler: ScheduleName | None = Field(
        default=None,
        description="`Karras` makes DPM++ 2M DPM++ 2M Karras; the other samplers have no Karras "
        "schedule here and keep their own (`info` says which sampler ran); default automatic",
    )
    batch_size: ImagesPerCall = 1
    n_iter: ImagesPerCall = Field(
        default=1, description=f"batch_size x n_iter is at most {MAX_IMAGES}"
    )
    steps: Steps = 50
    cfg_scale: GuidanceScale = 7.0
    width: Dimension = Field(
        default=512, description="absent: the model's family's default (SD 1.5: 512, SDXL: 1024)"
    )
    height: Dimension = Field(
        default=512, description="absent: the model's family's default (SD 1.5: 512, SDXL: 1024)"
    )
    send_images: bool = Field(default=True, description="false: `images` comes back empty")
    override_settings: dict[str, Any] = Field(
        default={},
        description="`sd_model_checkpoint`: the model of this request (one of `GET "
        "/sdapi/v1/sd-models`), over the key's `POST /sdapi/v1/options` choice; others ignored",
    )

    def override_model(self) -> str | None:
        model = self.override_settings.get(a1111_options.MODEL_OPTION)
        if model is not None and not isinstance(model, str):
            raise _invalid("override_settings", "sd_model_checkpoint must be a model's name")
        return model or None

    def generation(
        self, model: str | None = None, registry: LoraRegistry | None = None
    ) -> GenerationRequest:
        """The job's request, on `model` (None: the deployment's), with the prompt's LoRA tags
        as its `loras`, each checked against `registry`."""
        if self.batch_size * self.n_iter > MAX_IMAGES:
            raise _invalid("n_iter", f"batch_size x n_iter may be at most {MAX_IMAGES}")
        prompt, loras = _prompt_loras(self.prompt, registry)
        # A side the client did not give is the model's family's default, filled in at submission.
        sizes = {
            side: getattr(self, side)
            for side in ("width", "height")
            if side in self.model_fields_set
        }
        return GenerationRequest(
            prompt=prompt,
            loras=loras,
            model=model,
            negative_prompt=self.negative_prompt,
            **sizes,
            num_inference_steps=self.steps,
            guidance_scale=self.cfg_scale,
            scheduler=self._scheduler(),
            seed=None if self.seed == -1 else self.seed,
            num_images=self.batch_size * self.n_iter,
            output_format="png",
            # What /progress shows as `current_image`, as A1111's live previews do.
            preview=A1111_PREVIEW,
        )

    def _scheduler(self) -> Scheduler:
        chosen = SCHEDULER_BY_SAMPLER[self.sampler_name or self.sampler_index or DEFAULT_SAMPLER]
        karras = (self.scheduler or "automatic").lower() == "karras"
        return "dpmpp_2m_karras" if karras and chosen == "dpmpp_2m" else chosen


# An 8x8 grey PNG, base64 (resized to width x height like any input).
_EXAMPLE_IMAGE = (
    "iVBORw0KGgoAAAANSUhEUgAAAAgAAAAICAAAAADhZOFXAAAAEElEQVR4nGNsYIAAJgaK"
    "GAAmCACQXTClHgAAAABJRU5ErkJggg=="
)


class Img2ImgRequest(Txt2ImgRequest):
    """A1111's img2img request: txt2img's fields, a starting image and, for inpainting, a mask.
    `resize_mode`, `mask_blur`, `inpainting_fill`, `inpaint_full_res` and
    `inpainting_mask_invert` are accepted and ignored: the image is resized to width x height,
    and the area the mask keeps is the input image itself."""

    model_config = ConfigDict(
        extra="ignore",
        strict=True,
        json_schema_extra={
            "examples": [
                {
                    "prompt": "the same street in winter",
                    "init_images": [_EXAMPLE_IMAGE],
                    "denoising_strength": 0.6,
                    "steps": 20,
                    "width": 256,
                    "height": 256,
                },
                {
                    "prompt": "a red door",
                    "init_images": [_EXAMPLE_IMAGE],
                    "mask": _EXAMPLE_IMAGE,
                    "denoising_strength": 1.0,
                    "steps": 20,
                    "width": 256,
                    "height": 256,
                },
            ]
        },
    )

    init_images: list[InputImage] = Field(
        min_length=1, max_length=1, description="one image, base64 (or a data: URL)"
    )
    mask: InputImage | None = Field(default=None, description="white repaints, black keeps")
    denoising_strength: Annotated[float, Field(gt=0, le=1)] = 0.75

    def generation(
        self, model: str | None = None, registry: LoraRegistry | None = None
    ) -> GenerationRequest:
        fields = {
            **super().generation(model, registry).model_dump(exclude_unset=True),
            "init_image": self.init_images[0],
            "mask_image": self.mask,
            "strength": self.denoising_strength,
        }
        try:
            return GenerationRequest.model_validate(fields)
        except ValidationError as exc:
            raise _invalid("denoising_strength", exc.errors()[0]["msg"]) from exc


def _prompt_loras(prompt: str, registry: LoraRegistry | None) -> tuple[str, list[LoraSpec]]:
    """The prompt without its `<lora:name:scale>` tags, and the adapters they name."""
    try:
        text, tags = split_lora_tags(prompt)
    except ValueError as exc:
        raise _invalid("prompt", str(exc)) from exc
    for name, _ in tags:
        if registry is None or registry.path(name) is None:
            raise _invalid(
                "prompt",
                f"the prompt's LoRA tag names {name!r}, which is no LoRA adapter here; "
                "GET /sdapi/v1/loras lists them",
            )
    if len({name for name, _ in tags}) != len(tags):
        raise _invalid("prompt", "the prompt's LoRA tags name an adapter more than once")
    return text, [LoraSpec(name=name, scale=scale) for name, scale in tags]


def _invalid(field: str, message: str) -> ServiceError:
    detail = {"loc": ["body", field], "msg": message, "type": "value_error"}
    return ServiceError(ErrorType.VALIDATION_ERROR, message, [detail])


class Txt2ImgResponse(BaseModel):
    images: list[str] = Field(description="the PNG files, base64")
    parameters: dict[str, Any] = Field(description="the request, with its defaults filled in")
    info: str = Field(description="A1111's JSON string: seeds, sampler, model, infotexts...")


class Sampler(BaseModel):
    name: str
    aliases: list[str]
    options: dict[str, str]


class Schedule(BaseModel):
    name: str
    label: str
    aliases: list[str] | None = None
    default_rho: float = -1
    need_inner_model: bool = False


class SdModel(BaseModel):
    title: str
    model_name: str
    hash: str | None = None
    sha256: str | None = None
    filename: str
    config: str | None = None


class Options(BaseModel):
    """The options A1111 clients read, and any other option the key set, as it set it."""

    model_config = ConfigDict(extra="allow")

    sd_model_checkpoint: str | None = Field(
        description="the model of the key's A1111 requests: the one it chose with POST "
        "/sdapi/v1/options, else the deployment's default"
    )
    samples_format: str = "png"
    CLIP_stop_at_last_layers: int = 1
    sd_vae: str = "Automatic"


class ProgressState(BaseModel):
    skipped: bool = False
    interrupted: bool = False
    job: str = Field(description="the rendering job's id; empty when none is")
    job_count: int = Field(description="this key's jobs queued or rendering")
    job_timestamp: str
    job_no: int = 0
    sampling_step: int
    sampling_steps: int


class ProgressAnswer(BaseModel):
    progress: float = Field(description="the rendering job's share of steps done, 0 to 1")
    eta_relative: float = Field(description="seconds until it finishes")
    state: ProgressState
    current_image: str | None = None
    textinfo: str | None = None


class A1111Error(BaseModel):
    error: str = Field(description="the service's error type")
    detail: str
    body: str = ""
    errors: Any = Field(default=None, description="the fields at fault, for a validation error")


# A1111's live preview setting for its routes' jobs: a small JPEG every 5 steps.
A1111_PREVIEW = PreviewSpec(every_n_steps=5, format="jpeg", max_size=256)


class Lora(BaseModel):
    name: str
    alias: str
    path: str = Field(description="the adapter's file name in the registry")
    metadata: dict[str, Any] = {}


class PngInfoRequest(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": IMAGE_BODY_EXAMPLES})

    image: str = Field(description="the image file (PNG, JPEG or WebP), base64 or a data: URL")


class OptionsUpdate(BaseModel):
    """A1111's settings: `sd_model_checkpoint` picks the key's model; any other is kept."""

    model_config = ConfigDict(
        extra="allow",
        json_schema_extra={
            "examples": [
                {"sd_model_checkpoint": "stable-diffusion-v1-5/stable-diffusion-v1-5"},
                {"samples_format": "png", "CLIP_stop_at_last_layers": 1},
            ]
        },
    )

    sd_model_checkpoint: str | None = Field(
        default=None, description="one of `GET /sdapi/v1/sd-models`"
    )


class PngInfo(BaseModel):
    info: str = Field(description="the image's parameters text; empty when it carries none")
    items: dict[str, Any] = Field(description="the image's other text items")
    parameters: dict[str, Any] = Field(description="`info` parsed: `Prompt`, `Steps`, `Seed`...")


class Embeddings(BaseModel):
    loaded: dict[str, Any] = {}
    skipped: dict[str, Any] = {}


def a1111_error(error: ServiceError) -> JSONResponse:
    body = A1111Error(error=error.error_type.value, detail=error.message, errors=error.details)
    return JSONResponse(
        body.model_dump(mode="json"), status_code=error.status_code, headers=error.headers
    )


class A1111Route(DialectRoute):
    render_error = staticmethod(a1111_error)


router = APIRouter(prefix="/sdapi/v1", route_class=A1111Route, tags=["automatic1111"])


def _info(finished: Finished, body: Txt2ImgRequest, model: str, version: str) -> dict[str, Any]:
    """What A1111 reports about a render, as the JSON text of its `info`."""
    request = finished.record.request
    seeds = request.image_seeds()
    return {
        "prompt": request.prompt,
        "all_prompts": [request.prompt] * len(seeds),
        "negative_prompt": request.negative_prompt,
        "all_negative_prompts": [request.negative_prompt] * len(seeds),
        "seed": seeds[0],
        "all_seeds": seeds,
        "subseed": -1,
        "all_subseeds": [-1] * len(seeds),
        "subseed_strength": 0,
        "width": request.width,
        "height": request.height,
        "sampler_name": SAMPLER_NAMES[request.scheduler],
        "cfg_scale": request.guidance_scale,
        "steps": request.num_inference_steps,
        "batch_size": body.batch_size,
        "restore_faces": False,
        "face_restoration_model": None,
        "sd_model_name": model,
        "sd_model_hash": None,
        "seed_resize_from_w": -1,
        "seed_resize_from_h": -1,
        "denoising_strength": request.image_strength if request.init_image else None,
        "extra_generation_params": {},
        "index_of_first_image": 0,
        # One per image returned: an image the safety checker blocked is neither.
        "infotexts": [
            parameters_text(request, image.seed, model, image.safety)
            for image in finished.stored_images()
        ],
        "styles": [],
        "job_timestamp": f"{finished.record.created_at:%Y%m%d%H%M%S}",
        "clip_skip": 1,
        "is_using_inpainting_conditioning": False,
        "version": f"txt2img-service {version}",
    }


def _tracking(services: Services, caller: ApiKey) -> Tracking:
    """The key's A1111 jobs are listed while they render (what `/interrupt` and `/skip`
    cancel); an interrupted one comes back as it ended, as A1111 answers with what it had (a
    canceled job has no images)."""
    return Tracking(
        start=partial(a1111_options.track_job, services.redis, caller.id),
        end=partial(a1111_options.untrack_job, services.redis, caller.id),
        canceled_is_an_answer=True,
    )


@router.post(
    "/txt2img",
    response_model=Txt2ImgResponse,
    responses={
        200: {"headers": RATE_LIMIT_HEADERS},
        **error_responses(401, 409, 413, 422, 429, 503, 504, model=A1111Error),
    },
    summary="Generate images (AUTOMATIC1111 txt2img)",
    description=(
        "A1111's txt2img, authenticated with HTTP Basic (the API key as the password) or a "
        "bearer key. The job goes through the same queue, batching and limits as `POST /v1/jobs`; "
        "the answer comes when it has finished (at most `T2I_SYNC_WAIT_S`, then it is canceled: "
        "504). `sampler_name` is one of `GET /sdapi/v1/samplers`; images are PNGs whose "
        "`parameters` text matches `info`'s `infotexts`. Accepted and ignored: "
        f"{_NOT_SUPPORTED}."
    ),
)
async def txt2img(
    body: Txt2ImgRequest,
    services: ServicesDep,
    caller: BearerOrBasicCallerDep,
    request: Request,
) -> JSONResponse:
    model = body.override_model() or await run_in_threadpool(
        a1111_options.chosen_model, services.redis, caller.id
    )
    finished = await generate(
        services,
        request,
        caller,
        body.generation(model, services.loras),
        _tracking(services, caller),
    )
    files = await run_in_threadpool(finished.images, services) if body.send_images else []
    model = await run_in_threadpool(finished.model, services)
    answer = Txt2ImgResponse(
        images=[base64.b64encode(file).decode() for file in files],
        # Input images are not echoed back.
        parameters={
            **body.model_dump(mode="json", exclude={"init_images", "mask"}),
            # The size rendered: the family's default where the client gave none.
            "width": finished.record.request.width,
            "height": finished.record.request.height,
        },
        info=json.dumps(_info(finished, body, model, request.app.version)),
    )
    return JSONResponse(answer.model_dump(mode="json"), headers=finished.rate_limit.headers())


@router.post(
    "/img2img",
    response_model=Txt2ImgResponse,
    responses={
        200: {"headers": RATE_LIMIT_HEADERS},
        **error_responses(401, 409, 413, 422, 429, 503, 504, model=A1111Error),
    },
    summary="Image-to-image and inpainting (AUTOMATIC1111 img2img)",
    description=(
        "A1111's img2img: txt2img's fields with `init_images` (one base64 image), "
        "`denoising_strength` and, for inpainting, `mask`. The job goes through `POST /v1/jobs`'s "
        "path, input image checks included (a bad image is a 422)."
    ),
)
async def img2img(
    body: Img2ImgRequest,
    services: ServicesDep,
    caller: BearerOrBasicCallerDep,
    request: Request,
) -> JSONResponse:
    return await txt2img(body, services, caller, request)


@router.get(
    "/samplers",
    response_model=list[Sampler],
    responses=error_responses(401, 503, model=A1111Error),
    summary="The samplers txt2img takes (AUTOMATIC1111)",
)
def samplers(caller: BearerOrBasicCallerDep) -> list[Sampler]:
    return [
        Sampler(name=label, aliases=list(_ALIASES[scheduler]), options={})
        for scheduler, label in SAMPLER_NAMES.items()
    ]


@router.get(
    "/schedulers",
    response_model=list[Schedule],
    responses=error_responses(401, 503, model=A1111Error),
    summary="The noise schedules txt2img takes (AUTOMATIC1111)",
)
def schedulers(caller: BearerOrBasicCallerDep) -> list[Schedule]:
    return [
        Schedule(name="automatic", label="Automatic"),
        Schedule(name="karras", label="Karras", default_rho=7.0),
    ]


def _live_models(services: Services) -> list[str]:
    max_age_s = services.core.worker_heartbeat_max_age_s
    return live_models(services.redis, max_age_s)


@router.get(
    "/sd-models",
    response_model=list[SdModel],
    responses=error_responses(401, 503, model=A1111Error),
    summary="The models the live workers serve (AUTOMATIC1111)",
)
def sd_models(services: ServicesDep, caller: BearerOrBasicCallerDep) -> list[SdModel]:
    return [
        SdModel(title=model, model_name=model, filename=model) for model in _live_models(services)
    ]


@router.get(
    "/options",
    response_model=Options,
    responses=error_responses(401, 503, model=A1111Error),
    summary="The settings A1111 clients read (AUTOMATIC1111)",
    description="The key's options: what it set with `POST /sdapi/v1/options`, over defaults.",
)
def options(services: ServicesDep, caller: BearerOrBasicCallerDep) -> Options:
    stored = a1111_options.read_options(services.redis, caller.id)
    model = stored.get(a1111_options.MODEL_OPTION) or services.core.deployment_model
    return Options(**{**stored, a1111_options.MODEL_OPTION: model})


@router.post(
    "/options",
    responses={200: {"content": {"application/json": {"example": None}}}}
    | error_responses(401, 422, 503, model=A1111Error),
    summary="Set the key's options (AUTOMATIC1111)",
    description=(
        "`sd_model_checkpoint` (one of `GET /sdapi/v1/sd-models`) picks the model of this API "
        "key's later txt2img and img2img requests; a model no live worker serves is a 422. Any "
        "other option is kept and read back by `GET /sdapi/v1/options`, with no other effect. "
        "Answers `null`, as A1111 does."
    ),
)
def set_options(
    update: OptionsUpdate, services: ServicesDep, caller: BearerOrBasicCallerDep
) -> Response:
    body = update.model_dump(exclude_unset=True)
    model = body.get(a1111_options.MODEL_OPTION)
    if model is not None:
        served = _live_models(services)
        if model not in served:
            raise ServiceError(
                ErrorType.VALIDATION_ERROR,
                f"no live worker serves the model {model!r}; GET /sdapi/v1/sd-models lists "
                "those served",
                [
                    {
                        "loc": ["body", a1111_options.MODEL_OPTION],
                        "msg": "model not served",
                        "type": "model_not_served",
                    }
                ],
            )
    a1111_options.write_options(services.redis, caller.id, body)
    return Response("null", media_type="application/json")


@router.get(
    "/progress",
    response_model=ProgressAnswer,
    responses=error_responses(401, 422, 503, model=A1111Error),
    summary="Progress of this key's rendering job (AUTOMATIC1111)",
)
async def progress(
    services: ServicesDep,
    caller: BearerOrBasicCallerDep,
    skip_current_image: Annotated[
        bool, Query(description="true: no `current_image`, the latest preview")
    ] = False,
) -> ProgressAnswer:
    newest = (await services.jobs.page(caller.id, _PROGRESS_WINDOW, None, None)).jobs
    waiting = [job for job in newest if not job.status.is_terminal]
    running = next((job for job in waiting if job.status is JobStatus.RUNNING), None)
    step = total = 0
    eta_s = 0.0
    if running is not None and running.progress is not None:
        step, total = running.progress.step, running.progress.total
        eta_s = running.progress.eta_s or 0.0
    current_image = None
    if running is not None and running.request.preview is not None and not skip_current_image:
        preview = await services.jobs.preview(running.id)
        # A1111 sends the image as plain base64, not a data: URL.
        current_image = preview.image.split(",", 1)[1] if preview else None
    return ProgressAnswer(
        progress=round(step / total, 4) if total else 0.0,
        eta_relative=eta_s,
        current_image=current_image,
        state=ProgressState(
            job=running.id if running else "",
            job_count=len(waiting),
            job_timestamp=f"{running.created_at:%Y%m%d%H%M%S}" if running else "0",
            sampling_step=step,
            sampling_steps=total,
        ),
    )


def _interrupt(services: Services, caller: ApiKey, statuses: tuple[JobStatus, ...]) -> None:
    for job_id in a1111_options.tracked_jobs(services.redis, caller.id):
        record = services.store.get(job_id)
        if record is not None and record.owner == caller.id and record.status in statuses:
            cancel(services, record)


@router.post(
    "/interrupt",
    responses=error_responses(401, 503, model=A1111Error),
    summary="Stop this key's A1111 renders (AUTOMATIC1111)",
    description=(
        "Cancels the key's queued and running jobs that came from `/sdapi/v1/txt2img` and "
        "`/img2img` (not its `/v1/jobs` jobs), as `POST /v1/jobs/{id}/cancel` does. Each waiting "
        "txt2img call then answers 200 with no images (the job made none) and its `info`. "
        "Answers `{}`."
    ),
)
def interrupt(services: ServicesDep, caller: BearerOrBasicCallerDep) -> dict[str, Any]:
    _interrupt(services, caller, (JobStatus.QUEUED, JobStatus.RUNNING))
    return {}


@router.post(
    "/skip",
    responses=error_responses(401, 503, model=A1111Error),
    summary="Skip this key's running A1111 render (AUTOMATIC1111)",
    description=(
        "Cancels the key's running jobs from `/sdapi/v1/txt2img` and `/img2img`; its queued ones "
        "go on. A job renders all its images at once, so the whole job is skipped, not one "
        "image of it. Answers `{}`."
    ),
)
def skip(services: ServicesDep, caller: BearerOrBasicCallerDep) -> dict[str, Any]:
    _interrupt(services, caller, (JobStatus.RUNNING,))
    return {}


@router.get(
    "/loras",
    response_model=list[Lora],
    responses=error_responses(401, 503, model=A1111Error),
    summary="The LoRA adapters a prompt's <lora:name:scale> tags may name (AUTOMATIC1111)",
)
def loras(services: ServicesDep, caller: BearerOrBasicCallerDep) -> list[Lora]:
    return [
        Lora(name=lora.name, alias=lora.name, path=f"{lora.name}{LORA_SUFFIX}")
        for lora in services.loras.listing().data
    ]


@router.post(
    "/png-info",
    response_model=PngInfo,
    responses=error_responses(401, 422, 503, model=A1111Error),
    summary="The generation parameters an image carries (AUTOMATIC1111)",
    description=(
        "Reads the parameters text of a PNG (its `parameters` text chunk) or of a JPEG or WebP "
        "(its EXIF UserComment), as this service and A1111 write them."
    ),
)
def png_info(
    body: PngInfoRequest, services: ServicesDep, caller: BearerOrBasicCallerDep
) -> PngInfo:
    data = decode_upload(body.image, services.api)
    try:
        text, items = read_image_info(data)
    except ValueError as exc:
        raise _invalid("image", f"not a base64 image file: {exc}") from exc
    if text is None:
        return PngInfo(info="", items=items, parameters={})
    return PngInfo(info=text, items=items, parameters=parse_parameters(text))


def _empty_list(path: str, what: str) -> None:
    def answer(caller: BearerOrBasicCallerDep) -> list[Any]:
        return []

    router.add_api_route(
        path,
        answer,
        methods=["GET"],
        response_model=list[dict[str, Any]],
        responses=error_responses(401, 503, model=A1111Error),
        summary=f"{what}: none here (AUTOMATIC1111)",
        name=f"a1111_{path.strip('/').replace('-', '_')}",
    )


for _path, _what in (
    ("/sd-vae", "Separate VAEs (each model uses its own)"),
    ("/upscalers", "Upscalers"),
    ("/hypernetworks", "Hypernetworks"),
    ("/face-restorers", "Face restorers"),
    ("/realesrgan-models", "Real-ESRGAN models"),
    ("/prompt-styles", "Saved prompt styles"),
):
    _empty_list(_path, _what)


@router.get(
    "/embeddings",
    response_model=Embeddings,
    responses=error_responses(401, 503, model=A1111Error),
    summary="Textual-inversion embeddings: none here (AUTOMATIC1111)",
)
def embeddings(caller: BearerOrBasicCallerDep) -> Embeddings:
    return Embeddings()


@router.get(
    "/cmd-flags",
    responses=error_responses(401, 503, model=A1111Error),
    summary="How the server runs (AUTOMATIC1111)",
    description="The few of A1111's flags that are true of this service: an API without a UI.",
)
def cmd_flags(caller: BearerOrBasicCallerDep) -> dict[str, Any]:
    return {"api": True, "nowebui": True, "lora_dir": None, "ckpt_dir": None}


@router.get(
    "/memory",
    responses=error_responses(401, 503, model=A1111Error),
    summary="Memory of the API server (AUTOMATIC1111)",
    description=(
        "`ram`: this API server's memory, in bytes. The GPUs are on the workers, not here: "
        "`cuda` says so, as A1111 does where it has no CUDA."
    ),
)
def memory(caller: BearerOrBasicCallerDep) -> dict[str, Any]:
    page = os.sysconf("SC_PAGE_SIZE")
    total = os.sysconf("SC_PHYS_PAGES") * page
    free = os.sysconf("SC_AVPHYS_PAGES") * page
    return {
        "ram": {"free": free, "used": total - free, "total": total},
        "cuda": {"error": "the GPUs are on the render workers, not the API server"},
    }


_METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]


@router.api_route("/{path:path}", methods=_METHODS, include_in_schema=False)
def unknown(path: str, request: Request) -> None:
    """Any other /sdapi/v1 path: a 404 (a 405 for a known path's other methods), in A1111's
    error shape."""
    allowed = sorted(
        method
        for route in router.routes
        if isinstance(route, APIRoute)
        and route.path != "/sdapi/v1/{path:path}"
        and route.matches(request.scope)[0] is Match.PARTIAL
        for method in route.methods
    )
    if allowed:
        raise ServiceError(
            ErrorType.METHOD_NOT_ALLOWED,
            f"{request.method} is not allowed here; {', '.join(allowed)} is",
            headers={"Allow": ", ".join(allowed)},
        )
    raise ServiceError(ErrorType.NOT_FOUND, f"no route {request.url.path}")
