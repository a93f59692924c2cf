"""The diffusers pipeline: load once, render batches. Knows nothing of Celery, Redis or S3."""

import logging
import math
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
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
    # SD 1.5 ships PNDM with PRK steps skipped; with them, fewer than 4 steps cannot run.
    "pndm": (PNDMScheduler, {"skip_prk_steps": True}),
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


@dataclass(frozen=True)
class SpeedLevers:
    """Optional speed-ups of the warm pipeline; all off is plain diffusers (SDPA attention)."""

    compile: bool = False
    cuda_graphs: bool = False
    fuse_qkv: bool = False
    channels_last: bool = False

    @classmethod
    def for_device(
        cls,
        device: torch.device,
        *,
        compile: bool | None = None,
        cuda_graphs: bool | None = None,
        fuse_qkv: bool | None = None,
        channels_last: bool = False,
    ) -> "SpeedLevers":
        """Levers left unset are on where they pay: on CUDA, not on a CPU."""
        on_cuda = device.type == "cuda"

        def pick(value: bool | None) -> bool:
            return on_cuda if value is None else value

        return cls(
            compile=pick(compile),
            cuda_graphs=pick(cuda_graphs),
            fuse_qkv=pick(fuse_qkv),
            channels_last=channels_last,
        )


def batch_buckets(max_batch_images: int) -> list[int]:
    """Image counts a compiled pipeline is warmed for: powers of two, and the maximum itself."""
    buckets = {max_batch_images}
    size = 1
    while size < max_batch_images:
        buckets.add(size)
        size *= 2
    return sorted(buckets)


def padded_count(count: int, warmed: Iterable[int]) -> int:
    """The smallest warmed image count that holds `count` images, or `count` if none does."""
    return min((size for size in warmed if size >= count), default=count)


class _CompiledUNet:
    """The UNet's forward, compiled for the shapes seen while warming and eager for any other,
    so a request of a new size renders at once instead of waiting a minute for a recompile."""

    def __init__(self, unet: torch.nn.Module, cuda_graphs: bool) -> None:
        self._eager = unet.forward
        mode = "reduce-overhead" if cuda_graphs else "default"
        self._compiled = torch.compile(self._eager, mode=mode, fullgraph=True, dynamic=False)
        self._warmed: set[tuple[Any, ...]] = set()
        self.warming = False
        unet.forward = self._forward

    def _forward(self, sample: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        context = kwargs.get("encoder_hidden_states")
        shape = (tuple(sample.shape), None if context is None else tuple(context.shape))
        if self.warming:
            self._warmed.add(shape)
        if shape in self._warmed:
            return self._compiled(sample, *args, **kwargs)
        return self._eager(sample, *args, **kwargs)


def _use_persistent_compile_cache(directory: Path) -> None:
    """Keep inductor's compiled kernels across restarts, so a restarted worker is ready fast."""
    directory.mkdir(parents=True, exist_ok=True)
    # Inductor reads its cache directory from the environment each time it looks it up.
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(directory))
    import torch._inductor.config as inductor_config

    inductor_config.fx_graph_cache = True


# What must be equal for two jobs to share a pipeline call.
BatchKey = tuple[Any, ...]

# CLIP sees 77 tokens: BOS, 75 of the prompt, EOS. Longer prompts are encoded in 75-token chunks.
CHUNK_TOKENS = 75


def batch_key(batch: RenderBatch) -> BatchKey:
    """Everything in a batch but its items."""
    return (
        batch.width,
        batch.height,
        batch.num_inference_steps,
        batch.guidance_scale,
        batch.scheduler,
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
        self.levers = SpeedLevers()
        self._base_scheduler_config = pipeline.scheduler.config
        self._schedulers: dict[Scheduler, Any] = {}
        self._compiled_unet: _CompiledUNet | None = None
        # Image counts warmed per (width, height): batches are padded up to one of them.
        self._warmed_counts: dict[tuple[int, int], set[int]] = {}

    @property
    def device(self) -> torch.device:
        return self.pipeline.device

    @classmethod
    def load(
        cls,
        model_id: str,
        cache_dir: Path,
        device: str = "auto",
        levers: SpeedLevers | None = None,
    ) -> "DiffusionRenderer":
        target = resolve_device(device)
        dtype = torch.float16 if target.type == "cuda" else torch.float32
        source = str(ensure_tiny_model(cache_dir)) if model_id == TINY_MODEL_ID else model_id
        pipeline = _from_pretrained(source, dtype)
        pipeline.to(target)
        pipeline.set_progress_bar_config(disable=True)
        log.info("loaded %s on %s (%s)", model_id, target, dtype)
        renderer = cls(pipeline, model_name=model_id)
        if levers is not None:
            renderer.apply(levers, cache_dir / "inductor")
        return renderer

    def apply(self, levers: SpeedLevers, compile_cache_dir: Path | None = None) -> None:
        """Turn levers on; call once, before warming up."""
        if levers.channels_last:
            self.pipeline.unet.to(memory_format=torch.channels_last)
            self.pipeline.vae.to(memory_format=torch.channels_last)
        if levers.fuse_qkv:
            self.pipeline.fuse_qkv_projections()
        if levers.compile and self._compiled_unet is None:
            if compile_cache_dir is not None:
                _use_persistent_compile_cache(compile_cache_dir)
            self._compiled_unet = _CompiledUNet(self.pipeline.unet, levers.cuda_graphs)
        self.levers = replace(levers, cuda_graphs=levers.compile and levers.cuda_graphs)
        log.info("speed levers: %s", self.levers)

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

        items = self._pad(batch)
        # CPU generators make a seed give the same noise on any device.
        generators = [torch.Generator("cpu").manual_seed(item.seed) for item in items]
        prompts = [item.prompt for item in items]
        negatives = [item.negative_prompt for item in items]
        chunks = self.prompt_chunks(batch)
        if chunks == 1:
            conditioning: dict[str, Any] = {"prompt": prompts, "negative_prompt": negatives}
        else:
            conditioning = {
                "prompt_embeds": self._encode_in_chunks(prompts, chunks),
                "negative_prompt_embeds": self._encode_in_chunks(negatives, chunks),
            }
        result = self.pipeline(
            **conditioning,
            width=batch.width,
            height=batch.height,
            num_inference_steps=batch.num_inference_steps,
            guidance_scale=batch.guidance_scale,
            generator=generators,
            output_type="pil",
            callback_on_step_end=step_end,
        )
        return list(result.images)[: len(batch.items)]

    def _token_ids(self, text: str) -> list[int]:
        return self.pipeline.tokenizer(text, add_special_tokens=False, truncation=False).input_ids

    def prompt_chunks(self, batch: RenderBatch) -> int:
        """How many 75-token chunks the batch's longest prompt or negative prompt needs."""
        longest = max(
            len(self._token_ids(text))
            for item in batch.items
            for text in (item.prompt, item.negative_prompt)
        )
        return max(1, math.ceil(longest / CHUNK_TOKENS))

    def batch_key(self, batch: RenderBatch) -> BatchKey:
        """Jobs share a call only with jobs whose prompts take as many chunks: padding a prompt
        with empty chunks would change its image."""
        return (*batch_key(batch), self.prompt_chunks(batch))

    def _encode_in_chunks(self, texts: list[str], chunks: int) -> torch.Tensor:
        """Each text as `chunks` CLIP windows of BOS + 75 tokens + EOS, encoded separately and
        joined along the sequence: long prompts are not truncated (as popular SD UIs do it)."""
        tokenizer = self.pipeline.tokenizer
        rows: list[list[int]] = []
        for text in texts:
            ids = self._token_ids(text)
            for chunk in range(chunks):
                part = ids[chunk * CHUNK_TOKENS : (chunk + 1) * CHUNK_TOKENS]
                padding = [tokenizer.pad_token_id] * (CHUNK_TOKENS - len(part))
                rows.append([tokenizer.bos_token_id, *part, tokenizer.eos_token_id, *padding])
        input_ids = torch.tensor(rows, device=self.device)
        hidden = self.pipeline.text_encoder(input_ids)[0]
        return hidden.reshape(len(texts), chunks * hidden.shape[1], hidden.shape[2])

    def _pad(self, batch: RenderBatch) -> tuple[RenderItem, ...]:
        """The batch's items, padded to a warmed image count so the compiled UNet serves it."""
        warmed = self._warmed_counts.get((batch.width, batch.height), set())
        padding = padded_count(len(batch.items), warmed) - len(batch.items)
        return batch.items + (RenderItem("", "", 0),) * padding

    def warm_up(
        self, width: int = 512, height: int = 512, image_counts: Iterable[int] = (1,)
    ) -> None:
        """Small renders so the first job pays no start-up cost; with a compiled UNet, each
        image count warmed here is one the compiled graphs serve."""
        for count in image_counts:
            batch = RenderBatch(
                items=tuple(RenderItem("warm-up", "", index) for index in range(count)),
                width=width,
                height=height,
                # Three UNet calls: CUDA graph trees warm up, record, then replay.
                num_inference_steps=3,
                guidance_scale=7.5,
                scheduler="dpmpp_2m",
            )
            if self._compiled_unet is None:
                self.render(batch)
                continue
            self._compiled_unet.warming = True
            try:
                self.render(batch)
            finally:
                self._compiled_unet.warming = False
            self._warmed_counts.setdefault((width, height), set()).add(count)


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
