"""AUTOMATIC1111's web UI API, `/sdapi/v1/*`, over the one job path: what its clients (Open WebUI,
SillyTavern, scripts and bots) call, answered in its shapes."""

import base64
import json
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from api.compat import DialectRoute, Finished, generate
from api.deps import BearerOrBasicCallerDep, Services, ServicesDep
from api.openapi import RATE_LIMIT_HEADERS, enum_var_names, error_responses
from shared.errors import ErrorType, ServiceError
from shared.infotext import SAMPLER_NAMES, parameters_text
from shared.queue import live_models
from shared.schema import (
    MAX_SEED,
    WHOLE_FLOATS_AS_INT,
    Dimension,
    GenerationRequest,
    GuidanceScale,
    InputImage,
    JobStatus,
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
    "override_settings, script_name and script_args, alwayson_scripts, save_images"
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
    width: Dimension = 512
    height: Dimension = 512
    send_images: bool = Field(default=True, description="false: `images` comes back empty")

    def generation(self) -> GenerationRequest:
        if self.batch_size * self.n_iter > MAX_IMAGES:
            raise _invalid("n_iter", f"batch_size x n_iter may be at most {MAX_IMAGES}")
        return GenerationRequest(
            prompt=self.prompt,
            negative_prompt=self.negative_prompt,
            width=self.width,
            height=self.height,
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

    def generation(self) -> GenerationRequest:
        fields = {
            **super().generation().model_dump(),
            "init_image": self.init_images[0],
            "mask_image": self.mask,
            "strength": self.denoising_strength,
        }
        try:
            return GenerationRequest.model_validate(fields)
        except ValidationError as exc:
            raise _invalid("denoising_strength", exc.errors()[0]["msg"]) from exc


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
    sd_model_checkpoint: str | None = Field(description="a model the live workers serve")
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
    finished = await generate(services, request, caller, body.generation())
    files = await run_in_threadpool(finished.images, services) if body.send_images else []
    model = await run_in_threadpool(finished.model, services)
    answer = Txt2ImgResponse(
        images=[base64.b64encode(file).decode() for file in files],
        # Input images are not echoed back.
        parameters=body.model_dump(mode="json", exclude={"init_images", "mask"}),
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
)
def options(services: ServicesDep, caller: BearerOrBasicCallerDep) -> Options:
    models = _live_models(services)
    return Options(sd_model_checkpoint=models[0] if models else None)


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
