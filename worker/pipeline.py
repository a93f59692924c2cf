"""The diffusers pipeline: load once, render batches. Knows nothing of Celery, Redis or S3."""

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    UniPCMultistepScheduler,
)
from PIL.Image import Image

from shared.schema import GenerationRequest, Scheduler
from worker.tiny_model import TINY_MODEL_ID, ensure_tiny_model

log = logging.getLogger(__name__)

# Called after each denoising step with (steps done, total steps).
StepCallback = Callable[[int, int], None]

_SCHEDULERS: dict[Scheduler, tuple[Any, dict[str, Any]]] = {
    "dpmpp_2m": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpmpp_2m_karras": (
        DPMSolverMultistepScheduler,
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
    ),
    "euler": (EulerDiscreteScheduler, {}),
    "euler_a": (EulerAncestralDiscreteScheduler, {}),
    "ddim": (DDIMScheduler, {}),
    "pndm": (PNDMScheduler, {}),
    "lms": (LMSDiscreteScheduler, {}),
    "unipc": (UniPCMultistepScheduler, {}),
}


class ModelLoadError(Exception):
    """The configured model could not be loaded."""


@dataclass(frozen=True)
class RenderItem:
    """One image: its own prompt, negative prompt and seed."""

    prompt: str
    negative_prompt: str
    seed: int


@dataclass(frozen=True)
class RenderBatch:
    """Images that share one pipeline call: same size, steps, scheduler and guidance."""

    items: tuple[RenderItem, ...]
    width: int
    height: int
    num_inference_steps: int
    guidance_scale: float
    scheduler: Scheduler

    @classmethod
    def from_request(cls, request: GenerationRequest) -> "RenderBatch":
        items = tuple(
            RenderItem(request.prompt, request.negative_prompt, seed)
            for seed in request.image_seeds()
        )
        return cls(
            items=items,
            width=request.width,
            height=request.height,
            num_inference_steps=request.num_inference_steps,
            guidance_scale=request.guidance_scale,
            scheduler=request.scheduler,
        )


def resolve_device(requested: str) -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


class DiffusionRenderer:
    """A warm StableDiffusionPipeline on one device."""

    def __init__(self, pipeline: StableDiffusionPipeline, model_name: str) -> None:
        self.pipeline = pipeline
        self.model_name = model_name
        self._base_scheduler_config = pipeline.scheduler.config
        self._schedulers: dict[Scheduler, Any] = {}

    @property
    def device(self) -> torch.device:
        return self.pipeline.device

    @classmethod
    def load(cls, model_id: str, cache_dir: Path, device: str = "auto") -> "DiffusionRenderer":
        target = resolve_device(device)
        dtype = torch.float16 if target.type == "cuda" else torch.float32
        source = str(ensure_tiny_model(cache_dir)) if model_id == TINY_MODEL_ID else model_id
        pipeline = _from_pretrained(source, dtype)
        pipeline.to(target)
        pipeline.set_progress_bar_config(disable=True)
        log.info("loaded %s on %s (%s)", model_id, target, dtype)
        return cls(pipeline, model_name=model_id)

    def _scheduler(self, name: Scheduler) -> Any:
        if name not in self._schedulers:
            scheduler_class, overrides = _SCHEDULERS[name]
            self._schedulers[name] = scheduler_class.from_config(
                self._base_scheduler_config, **overrides
            )
        return self._schedulers[name]

    @torch.inference_mode()
    def render(self, batch: RenderBatch, on_step: StepCallback | None = None) -> list[Image]:
        """One pipeline call for the whole batch; image i depends only on item i and the batch's
        shared settings."""
        self.pipeline.scheduler = self._scheduler(batch.scheduler)
        total = batch.num_inference_steps

        def step_end(pipe: Any, step: int, timestep: Any, tensors: dict[str, Any]) -> dict:
            if on_step is not None:
                on_step(step + 1, total)
            return tensors

        # CPU generators make a seed give the same noise on any device.
        generators = [torch.Generator("cpu").manual_seed(item.seed) for item in batch.items]
        result = self.pipeline(
            prompt=[item.prompt for item in batch.items],
            negative_prompt=[item.negative_prompt for item in batch.items],
            width=batch.width,
            height=batch.height,
            num_inference_steps=batch.num_inference_steps,
            guidance_scale=batch.guidance_scale,
            generator=generators,
            output_type="pil",
            callback_on_step_end=step_end,
        )
        return list(result.images)

    def warm_up(self, width: int = 512, height: int = 512) -> None:
        """One small render so the first job pays no start-up cost."""
        batch = RenderBatch(
            items=(RenderItem("warm-up", "", 0),),
            width=width,
            height=height,
            num_inference_steps=2,
            guidance_scale=7.5,
            scheduler="dpmpp_2m",
        )
        self.render(batch)


def _from_pretrained(source: str, dtype: torch.dtype) -> StableDiffusionPipeline:
    options: dict[str, Any] = {
        "dtype": dtype,
        "safety_checker": None,
        "requires_safety_checker": False,
    }
    try:
        if dtype == torch.float16:
            try:
                return StableDiffusionPipeline.from_pretrained(source, variant="fp16", **options)
            except (OSError, ValueError):
                log.info("%s has no fp16 variant; loading the default weights as fp16", source)
        return StableDiffusionPipeline.from_pretrained(source, **options)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(
            f"could not load T2I_MODEL_ID={source!r}: {exc}\n"
            "Without network access and no local copy, point T2I_MODEL_ID at a local diffusers "
            "directory, or set T2I_MODEL_ID=tiny for the tiny offline test model."
        ) from exc
