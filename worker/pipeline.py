"""The render core: one warm diffusers pipeline's modules on one device, and one denoising loop
for every kind of job. Knows nothing of Celery, Redis or S3.

The core owns the modules and their dtype, the compiled UNet, fused projections, LoRA slots,
scheduler set-up, generators, step reporting and the VAE decode. A job kind (text-to-image,
image-to-image, inpainting, ControlNet: worker/kinds.py) is a small strategy handed to the core
at load: it says where a batch's denoising starts and what each step adds, and depends on the
core, never the reverse. So every kind runs on the same fast path: the dtype the modules were
loaded in, the graphs compiled at warm-up, adapters in their slots.
"""

import contextlib
import copy
import hashlib
import inspect
import json
import logging
import math
import os
import threading
import time
from collections import defaultdict, deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import diffusers
import torch
from diffusers import (
    AutoencoderTiny,
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UniPCMultistepScheduler,
)
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image as PILImage
from PIL.Image import Image

from shared.families import SD15, SDXL, ModelFamily
from shared.loras import LoraRegistry
from shared.schema import Scheduler
from shared.settings import DEFAULT_MODEL_ID
from worker.compile_cache import CompileArtifacts, use_persistent_caches
from worker.lora_slots import SLOTS, LoraSlots, UnknownAdapter
from worker.models import ModelLoadError, load_pipeline, model_source
from worker.quantization import UnetQuant, quantize_unet
from worker.render_types import (
    AdapterSet,
    BatchKey,
    NonFiniteImage,
    PreviewAsk,
    PreviewCallback,
    RenderBatch,
    RenderedImages,
    RenderItem,
    StepCallback,
    batch_key,
)
from worker.tiny_preview import TINY_PREVIEW_VAE_ID

__all__ = [
    "AdapterSet",
    "BatchKey",
    "NonFiniteImage",
    "PreviewAsk",
    "PreviewCallback",
    "RenderBatch",
    "RenderItem",
    "RenderedImages",
    "StepCallback",
    "batch_key",
]

log = logging.getLogger(__name__)


class _TimestepsOnHost:
    """Keeps a scheduler's timesteps on the CPU, whatever device the pipeline asks for: its step
    arithmetic then never reads device memory (a host sync per step), and the UNet wrapper moves
    each timestep to the device with a non-blocking copy."""

    def set_timesteps(
        self, num_inference_steps: Any = None, device: Any = None, *args: Any, **kwargs: Any
    ) -> None:
        super().set_timesteps(num_inference_steps, "cpu", *args, **kwargs)  # type: ignore[misc]


def _on_host(scheduler_class: type) -> type:
    return type(scheduler_class.__name__, (_TimestepsOnHost, scheduler_class), {})


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


@dataclass(frozen=True)
class SpeedLevers:
    """Optional speed-ups of the warm pipeline; all off is plain diffusers (SDPA attention)."""

    compile: bool = False
    cuda_graphs: bool = False
    fuse_qkv: bool = False
    channels_last: bool = False
    cudnn_benchmark: bool = False
    # The VAE's decode compiled by inductor, and channels-last for the VAE alone.
    compile_vae: bool = False
    vae_channels_last: bool = False
    # Opt-in, for what they cost in image fidelity: inductor's autotuning of the UNet's kernels
    # (a much longer first compile), and its linear layers in "fp8" or "int8".
    compile_autotune: bool = False
    unet_quant: UnetQuant | None = None
    # DeepCache-style feature reuse: the whole UNet runs every `deepcache_interval` steps (and
    # at the last), the steps between run only its outermost blocks on the deep features kept
    # from the last whole step. 0 or 1: every step whole. Changes the image.
    deepcache_interval: int = 0

    @classmethod
    def for_device(
        cls,
        device: torch.device,
        *,
        compile: bool | None = None,
        cuda_graphs: bool | None = None,
        fuse_qkv: bool | None = None,
        channels_last: bool = False,
        cudnn_benchmark: bool | None = None,
        compile_vae: bool | None = None,
        vae_channels_last: bool = False,
        compile_autotune: bool = False,
        unet_quant: UnetQuant | None = None,
        deepcache_interval: int = 0,
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
            cudnn_benchmark=pick(cudnn_benchmark),
            compile_vae=pick(compile_vae),
            vae_channels_last=vae_channels_last,
            compile_autotune=compile_autotune,
            unet_quant=unet_quant,
            deepcache_interval=deepcache_interval,
        )


def compiled_image_counts(max_batch_images: int) -> list[int]:
    """Image counts the UNet is compiled for by default: one (latency) and the largest batch
    (throughput). Each costs a trace at every start, so a few counts keep a restart fast."""
    return sorted({1, max_batch_images})


def cheapest_count(count: int, seconds_per_count: dict[int, float], compiled: set[int]) -> int:
    """How many images to render a batch of `count` as: itself, or padded up to a compiled count
    where that was measured to be faster. Without a measurement, no padding."""
    own = seconds_per_count.get(count)
    if own is None or count in compiled:
        return count
    candidates = [m for m in compiled if m > count and m in seconds_per_count]
    best = min(candidates, key=lambda m: seconds_per_count[m], default=None)
    return best if best is not None and seconds_per_count[best] < own else count


class _Event(Protocol):
    def record(self) -> None: ...
    def query(self) -> bool: ...
    def synchronize(self) -> None: ...


class FinishedSteps:
    """Turns "step launched" into "step finished". On CUDA the host queues work ahead of the
    device, so each step's end is marked with an event, a step is reported only once its event
    has completed, and the host never runs more than `lag` steps ahead: progress shows steps
    done, not queued, and a cancel takes effect within `lag` steps. On a CPU, launched is done."""

    def __init__(self, make_event: Callable[[], _Event] | None, lag: int = 2) -> None:
        self._make_event = make_event
        self._lag = lag
        self._launched = 0
        self._pending: deque[tuple[int, _Event]] = deque()

    @classmethod
    def on(cls, device: torch.device) -> "FinishedSteps":
        return cls(torch.cuda.Event if device.type == "cuda" else None)

    def launched(self) -> list[int]:
        """Mark the end of the step just queued; the steps that finished since the last call."""
        self._launched += 1
        if self._make_event is None:
            return [self._launched]
        event = self._make_event()
        event.record()
        self._pending.append((self._launched, event))
        finished = []
        while self._pending and (len(self._pending) > self._lag or self._pending[0][1].query()):
            step, oldest = self._pending.popleft()
            # Waits only when the host is `lag` steps ahead; the device still has those queued.
            oldest.synchronize()
            finished.append(step)
        return finished

    def rest(self) -> list[int]:
        """After the last step: every step not reported yet, once each has finished."""
        finished = []
        while self._pending:
            step, event = self._pending.popleft()
            event.synchronize()
            finished.append(step)
        return finished


# A step's previews, made once the step has finished on the device: {item index: image}.
PendingPreviews = Callable[[], dict[int, Image]]


class StepReporter:
    """Hands `on_step` each denoising step once it has finished on the device, and then
    `on_preview` that step's previews: call `step_end` after each step is launched (with the
    step's previews, their copy to the host already queued), and `finish` after the last."""

    def __init__(
        self,
        device: torch.device,
        on_step: StepCallback | None,
        total: int,
        on_preview: PreviewCallback | None = None,
    ) -> None:
        self._steps = FinishedSteps.on(device)
        self._on_step = on_step
        self._on_preview = on_preview
        self._total = total
        self._launched = 0
        # Previews of steps launched but not reported yet, by step.
        self._previews: dict[int, PendingPreviews] = {}

    def _report(self, finished: list[int]) -> None:
        for step in finished:
            if self._on_step is not None:
                self._on_step(step, self._total)
            previews = self._previews.pop(step, None)
            if previews is not None and self._on_preview is not None:
                self._on_preview(step, self._total, previews())

    def step_end(self, previews: PendingPreviews | None = None) -> None:
        self._launched += 1
        if previews is not None:
            # Queued before the step's end is marked: the step's event covers their copy.
            self._previews[self._launched] = previews
        self._report(self._steps.launched())

    def finish(self) -> None:
        self._report(self._steps.rest())


def resized(image: Image, width: int, height: int) -> Image:
    if image.size == (width, height):
        return image
    return image.resize((width, height), PILImage.Resampling.LANCZOS)


class _UNetForward:
    """Stands in for the UNet's forward: timesteps reach the UNet as float32 on its device
    (schedulers feed int64 or float32, on the host), and once compiled, the inputs seen while
    warming run compiled and any other eager, so a request of a new size renders at once instead
    of waiting a minute for a compile. What was warmed is told by the input shapes and the
    variant: LoRA slots on or off, ControlNet residuals or none. Feature reuse's whole and
    shallow steps are forwards of their own, compiled and warmed the same way."""

    def __init__(self, unet: torch.nn.Module) -> None:
        self._eager = unet.forward
        self._compiled: Callable[..., Any] | None = None
        self._warmed: set[tuple[Any, ...]] = set()
        self.warming = False
        unet.forward = self._forward
        # Feature reuse's two forwards, eager and (once compiled) compiled, each its own graphs.
        self._reuse_parts: dict[str, tuple[Callable[..., Any], Callable[..., Any] | None]] = {
            "deep": (partial(deep_forward, unet), None),
            "shallow": (partial(shallow_forward, unet), None),
        }
        self._warmed_reuse: set[tuple[Any, ...]] = set()

    @property
    def compiled(self) -> bool:
        return self._compiled is not None

    @property
    def warmed(self) -> set[tuple[Any, ...]]:
        return set(self._warmed)

    def compile(self, cuda_graphs: bool, autotune: bool = False) -> None:
        if autotune:
            mode = "max-autotune" if cuda_graphs else "max-autotune-no-cudagraphs"
        else:
            mode = "reduce-overhead" if cuda_graphs else "default"
        self._compiled = torch.compile(self._eager, mode=mode, fullgraph=True, dynamic=False)
        # Compiled lazily: no cost unless feature reuse renders through them.
        self._reuse_parts = {
            part: (eager, torch.compile(eager, mode=mode, fullgraph=True, dynamic=False))
            for part, (eager, _) in self._reuse_parts.items()
        }
        # One graph per warmed shape and variant; past the limit dynamo would go eager silently.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)

    def _forward(self, sample: torch.Tensor, timestep: Any, *args: Any, **kwargs: Any) -> Any:
        # One timestep dtype, and one memory layout of the latents (a VAE encoding's come out
        # strided otherwise), mean one compiled graph for every scheduler and job kind.
        timestep = _timestep_on(sample.device, timestep)
        sample = sample.contiguous()
        if self._compiled is None:
            return self._eager(sample, timestep, *args, **kwargs)
        key = (
            *unet_input_shape(sample, kwargs.get("encoder_hidden_states")),
            SLOTS.on,
            kwargs.get("down_block_additional_residuals") is not None,
        )
        if self.warming:
            self._warmed.add(key)
        if key in self._warmed:
            return self._compiled(sample, timestep, *args, **kwargs)
        return self._eager(sample, timestep, *args, **kwargs)

    @property
    def warmed_reuse(self) -> set[tuple[Any, ...]]:
        """The feature-reuse graphs warmed: input shapes, LoRA slots on, "deep" or "shallow"."""
        return set(self._warmed_reuse)

    def deep(
        self, sample: torch.Tensor, timestep: Any, context: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole UNet, as its forward computes it, and the deep features it fed the last up
        block with."""
        return self._reuse_call("deep", sample, timestep, context)

    def shallow(
        self, sample: torch.Tensor, timestep: Any, context: torch.Tensor, features: torch.Tensor
    ) -> torch.Tensor:
        """The UNet's outermost blocks alone, on `features` kept from a whole step."""
        return self._reuse_call("shallow", sample, timestep, context, features)

    def _reuse_call(
        self, part: str, sample: torch.Tensor, timestep: Any, *args: torch.Tensor
    ) -> Any:
        timestep = _timestep_on(sample.device, timestep)
        sample = sample.contiguous()
        eager, compiled = self._reuse_parts[part]
        if compiled is None:
            return eager(sample, timestep, *args)
        key = (*unet_input_shape(sample, args[0]), SLOTS.on, part)
        if self.warming:
            self._warmed_reuse.add(key)
        if key in self._warmed_reuse:
            return compiled(sample, timestep, *args)
        return eager(sample, timestep, *args)


class VaeDecode:
    """The VAE's decode. Compiled (the `compile_vae` lever), it decodes one image per call, so
    each size is one graph whatever the batch (at 512x512 one image already keeps a card busy),
    and only the sizes decoded while warming: others decode eager, a slice of images at a time,
    at once instead of after a compile."""

    def __init__(self, vae: torch.nn.Module) -> None:
        self._vae = vae
        self._compiled: Callable[[torch.Tensor], torch.Tensor] | None = None
        self._warmed: set[tuple[int, ...]] = set()
        self.warming = False

    def compile(self) -> None:
        self._compiled = torch.compile(self._eager, fullgraph=True, dynamic=False)

    def _eager(self, latents: torch.Tensor) -> torch.Tensor:
        return self._vae.decode(latents, return_dict=False)[0]

    def __call__(self, latents: torch.Tensor, images_per_slice: int) -> torch.Tensor:
        shape = tuple(latents.shape[1:])
        if self._compiled is not None and self.warming:
            self._warmed.add(shape)
        if self._compiled is not None and shape in self._warmed:
            parts = [self._compiled(image) for image in latents.split(1)]
        else:
            parts = [self._eager(part) for part in latents.split(images_per_slice)]
        return parts[0] if len(parts) == 1 else torch.cat(parts)


class LeverUnsupported(ValueError):
    """A speed lever this model cannot run with; the worker refuses to start, saying why."""


def deepcache_unsupported(unet: torch.nn.Module) -> str | None:
    """Why feature reuse cannot run this UNet, or None: its forward is re-traced below for the
    conditioning SD 1.5's UNet takes (timestep and text), nothing more."""
    config = unet.config
    extras = {
        "class embeddings": config.class_embed_type or config.num_class_embeds,
        "added embeddings": config.addition_embed_type,
        "an encoder projection": config.encoder_hid_dim_type,
        "timestep conditioning": config.time_cond_proj_dim,
    }
    present = [name for name, value in extras.items() if value]
    if present:
        return "the UNet takes " + ", ".join(present)
    if len(unet.up_blocks) < 2 or unet.mid_block is None:
        return "the UNet has no deep path to reuse"
    return None


def deepcache_full_step(index: int, steps: int, interval: int) -> bool:
    """Whether step `index` of `steps` runs the whole UNet with feature reuse every `interval`
    steps: the first of each `interval` steps, and the last step."""
    return interval <= 1 or index % interval == 0 or index == steps - 1


def _embed(
    unet: Any, sample: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The first part of UNet2DConditionModel.forward: the input, timestep embedding and text
    conditioning as its blocks take them."""
    if unet.config.center_input_sample:
        sample = 2 * sample - 1.0
    embedding = unet.time_embedding(unet.get_time_embed(sample=sample, timestep=timestep), None)
    if unet.time_embed_act is not None:
        embedding = unet.time_embed_act(embedding)
    context = unet.process_encoder_hidden_states(
        encoder_hidden_states=context, added_cond_kwargs=None
    )
    return sample, embedding, context


def _down(
    block: Any, sample: torch.Tensor, embedding: torch.Tensor, context: torch.Tensor
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    if getattr(block, "has_cross_attention", False):
        return block(hidden_states=sample, temb=embedding, encoder_hidden_states=context)
    return block(hidden_states=sample, temb=embedding)


def _up(
    block: Any,
    sample: torch.Tensor,
    embedding: torch.Tensor,
    residuals: tuple[torch.Tensor, ...],
    context: torch.Tensor,
    upsample_size: Any,
) -> torch.Tensor:
    if getattr(block, "has_cross_attention", False):
        return block(
            hidden_states=sample,
            temb=embedding,
            res_hidden_states_tuple=residuals,
            encoder_hidden_states=context,
            upsample_size=upsample_size,
        )
    return block(
        hidden_states=sample,
        temb=embedding,
        res_hidden_states_tuple=residuals,
        upsample_size=upsample_size,
    )


def _out(unet: Any, sample: torch.Tensor) -> torch.Tensor:
    if unet.conv_norm_out:
        sample = unet.conv_act(unet.conv_norm_out(sample))
    return unet.conv_out(sample)


def _mid(
    unet: Any, sample: torch.Tensor, embedding: torch.Tensor, context: torch.Tensor
) -> torch.Tensor:
    if getattr(unet.mid_block, "has_cross_attention", False):
        return unet.mid_block(sample, embedding, encoder_hidden_states=context)
    return unet.mid_block(sample, embedding)


def deep_forward(
    unet: Any, sample: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """UNet2DConditionModel.forward for text conditioning alone, the same operations in the same
    order (so the same output), and the input of its last up block: the deep features."""
    sample, embedding, context = _embed(unet, sample, timestep, context)
    # Sizes that are no multiple of the overall upsampling tell each upsampler its output size.
    factor = 2**unet.num_upsamplers
    forward_upsample_size = any(dim % factor != 0 for dim in sample.shape[-2:])
    sample = unet.conv_in(sample)
    residuals: tuple[torch.Tensor, ...] = (sample,)
    for block in unet.down_blocks:
        sample, more = _down(block, sample, embedding, context)
        residuals += more
    sample = _mid(unet, sample, embedding, context)
    *inner, last = unet.up_blocks
    for block in inner:
        taken = len(block.resnets)
        block_residuals, residuals = residuals[-taken:], residuals[:-taken]
        upsample_size = residuals[-1].shape[2:] if forward_upsample_size else None
        sample = _up(block, sample, embedding, block_residuals, context, upsample_size)
    features = sample
    sample = _up(last, sample, embedding, residuals[-len(last.resnets) :], context, None)
    return _out(unet, sample), features


def shallow_forward(
    unet: Any,
    sample: torch.Tensor,
    timestep: torch.Tensor,
    context: torch.Tensor,
    features: torch.Tensor,
) -> torch.Tensor:
    """The UNet's shallow branch on deep features from an earlier step: conv_in, the first down
    block, the last up block (with the skips it takes: conv_in's output and the first down
    block's, short of its downsampler's) and the output convolution."""
    sample, embedding, context = _embed(unet, sample, timestep, context)
    sample = unet.conv_in(sample)
    _, first = _down(unet.down_blocks[0], sample, embedding, context)
    last = unet.up_blocks[-1]
    residuals = (sample, *first)[: len(last.resnets)]
    return _out(unet, _up(last, features, embedding, residuals, context, None))


def unet_input_shape(sample: torch.Tensor, context: torch.Tensor | None) -> tuple[Any, ...]:
    return (tuple(sample.shape), None if context is None else tuple(context.shape))


def _timestep_on(device: torch.device, timestep: Any) -> torch.Tensor:
    """The timestep as a float32 tensor on `device`, copied without blocking the host."""
    value = torch.as_tensor(timestep, dtype=torch.float32)
    if value.device == device:
        return value
    if device.type == "cuda" and value.device.type == "cpu":
        value = value.pin_memory()
    return value.to(device, non_blocking=True)


def compiled_graphs() -> int:
    """Graphs dynamo has compiled in this process so far."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def _use_persistent_compile_cache(directory: Path) -> None:
    """Keep inductor's compiled kernels across restarts, so a restarted worker is ready fast."""
    use_persistent_caches(directory)
    import torch._inductor.config as inductor_config

    # 1x1 convolutions as matrix products: cheaper on tensor cores, a common SD setting.
    inductor_config.conv_1x1_as_mm = True


# CLIP sees 77 tokens: BOS, 75 of the prompt, EOS. Longer prompts are encoded in 75-token chunks.
CHUNK_TOKENS = 75
# Denoising steps of each warm-up render: CUDA graph trees warm up, record, then replay.
WARM_UP_STEPS = 3
# Beside the compiled kernels in the compile cache directory.
RENDER_COSTS_FILE = "render-costs.json"
# Images of 1024x1024 (or four of 512x512) per VAE decode call: a full batch of large images
# decoded at once peaks at many GB; a slice of this size costs little at any batch size.
DEFAULT_DECODE_SLICE_PIXELS = 1024 * 1024
# The dtype names T2I_DTYPE takes.
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def resolve_device(requested: str) -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def resolve_dtype(requested: str, device: torch.device) -> torch.dtype:
    """`auto`: float16 on CUDA, float32 elsewhere (half precision is slow or missing on CPUs)."""
    if requested == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return DTYPES[requested]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def limit_torch_threads(threads: int) -> None:
    """Hold this process's CPU rendering to `threads` threads (intra-op, and inter-op before any
    parallel work has started)."""
    torch.set_num_threads(threads)
    torch.set_num_interop_threads(threads)


def load_preview_vae(
    source: str, cache_dir: Path, dtype: torch.dtype, device: torch.device
) -> AutoencoderTiny:
    """The tiny autoencoder that decodes previews (a hub id or directory, or "tiny" for the tiny
    offline one), in `dtype` on `device`."""
    location = source
    if source == TINY_PREVIEW_VAE_ID:
        # Imported only where asked for: it builds a test model.
        from worker.tiny_preview import ensure_tiny_preview_vae

        location = str(ensure_tiny_preview_vae(cache_dir))
    try:
        vae = AutoencoderTiny.from_pretrained(location, torch_dtype=dtype)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(
            f"could not load T2I_PREVIEW_VAE={source!r}: {exc}\n"
            "Point it at a local AutoencoderTiny directory, or unset it for the linear previews."
        ) from exc
    log.info("previews decoded by the tiny autoencoder %s", location)
    return vae.to(device).eval()


def _vae_overflows(pipeline: Any, dtype: torch.dtype) -> bool:
    """Whether the pipeline's VAE must run in float32: an SDXL VAE that says so, in float16.
    (SD 1.5's VAE configs carry the same flag, but SD 1.5 runs its VAE in float16 well, as its
    diffusers pipeline does.)"""
    return (
        isinstance(pipeline, StableDiffusionXLPipeline)
        and dtype == torch.float16
        and bool(pipeline.vae.config.get("force_upcast", False))
    )


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass(frozen=True)
class Conditioning:
    """What a batch's text (and for SDXL, its size) gives the UNet at every step: the text
    embeddings, the unconditional rows first when guided, and SDXL's added conditioning (pooled
    text embeddings and size ids) in the same row order."""

    embeddings: torch.Tensor
    added: dict[str, torch.Tensor] | None = None

    def unet_arguments(self) -> dict[str, Any]:
        """The keyword arguments a UNet (or a ControlNet) takes them as."""
        arguments: dict[str, Any] = {"encoder_hidden_states": self.embeddings}
        if self.added is not None:
            arguments["added_cond_kwargs"] = self.added
        return arguments


# Extra UNet arguments for one step: (scaled latents, timestep on the device, conditioning).
UNetInputs = Callable[[torch.Tensor, torch.Tensor, Conditioning], dict[str, Any]]


@dataclass
class Denoising:
    """Where a batch's denoising starts, as a job kind sets it up: the latents, the timesteps to
    run (on the host), and what the kind adds to each step and to the decoded pixels."""

    latents: torch.Tensor
    timesteps: torch.Tensor
    # More UNet inputs for each step (ControlNet's residuals).
    unet_inputs: UNetInputs | None = None
    # After each scheduler step, with the step's index (inpainting keeps the unmasked part).
    after_step: Callable[[int, torch.Tensor], torch.Tensor] | None = None
    # On the decoded pixels in [0, 1] (inpainting pastes the unmasked input back).
    finish: Callable[[torch.Tensor], torch.Tensor] | None = None


@dataclass(frozen=True)
class Start:
    """What a job kind starts a batch from: the core, the batch and its items (padded), the
    scheduler, and each image's host generator."""

    core: "DiffusionRenderer"
    batch: RenderBatch
    items: Sequence[RenderItem]
    scheduler: Any
    generators: list[torch.Generator]


class JobKind(Protocol):
    """A kind of job the core renders: how a batch of it starts and what each step adds."""

    name: str

    def accepts(self, batch: RenderBatch) -> bool: ...

    def start(self, start: Start) -> Denoising: ...

    def modules(self) -> dict[str, torch.nn.Module]:
        """Its own modules beside the pipeline's (a ControlNet per type), by name."""
        ...

    def warm_up_batch(self, count: int, width: int, height: int) -> RenderBatch | None:
        """A batch whose UNet graph the kind needs compiled apart from plain text-to-image."""
        ...


class DiffusionRenderer:
    """The render core: a warm SD 1.5 or SDXL pipeline's modules on one device, and the job
    kinds it serves. The model's family changes only how text becomes conditioning (and the
    warm-up's default size); every kind and lever runs the same loop for both."""

    def __init__(
        self,
        pipeline: StableDiffusionPipeline | StableDiffusionXLPipeline,
        model_name: str,
        kinds: Sequence[JobKind] = (),
        decode_slice_pixels: int = DEFAULT_DECODE_SLICE_PIXELS,
        max_batch_pixels: int | None = None,
        preview_vae: AutoencoderTiny | None = None,
    ) -> None:
        self.pipeline = pipeline
        self.model_name = model_name
        self.kinds = list(kinds)
        self.decode_slice_pixels = decode_slice_pixels
        # Padding a batch up to a compiled count never takes it past this.
        self.max_batch_pixels = max_batch_pixels
        self.levers = SpeedLevers()
        self._base_scheduler_config = pipeline.scheduler.config
        self._schedulers: dict[Scheduler, Any] = {}
        self._unet = _UNetForward(pipeline.unet)
        self._vae_decode = VaeDecode(pipeline.vae)
        # Per (width, height): the image counts compiled, and seconds of a warm-up render by image
        # count (what padding decides on).
        self._compiled_counts: dict[tuple[int, int], set[int]] = {}
        self.render_costs: dict[tuple[int, int], dict[int, float]] = {}
        # Where the start-up time went: compiling each image count, timing every count.
        self.warm_up_seconds: dict[str, float] = {}
        self._render_cost_cache: RenderCostCache | None = None
        # Where torch's portable compile artifacts are kept; None: not kept.
        self._compile_cache_dir: Path | None = None
        self.loras: LoraSlots | None = None
        # Graphs compiled when the warm-up ended; None until then.
        self._graphs_when_warm: int | None = None
        # Jobs count their prompts' tokens on their own threads while the GPU thread renders. A
        # tokenizer keeps the last call's padding and truncation as state, so a count made
        # during the pipeline's own tokenization could leave its negative prompt unpadded (or
        # pad the count): counting uses a private copy, one thread at a time.
        self._counting_tokenizer = copy.deepcopy(pipeline.tokenizer)
        # Counting is meant to run past the model's window: no warning that it does.
        self._counting_tokenizer.model_max_length = int(1e30)
        self._counting_lock = threading.Lock()
        # Latents to preview RGB (weight, bias), fitted at the first preview asked; unused when
        # a tiny autoencoder decodes the previews.
        self._preview_weights: tuple[torch.Tensor, torch.Tensor] | None = None
        self.preview_vae = preview_vae

    @property
    def device(self) -> torch.device:
        return self.pipeline.device

    @property
    def dtype(self) -> torch.dtype:
        return self.pipeline.unet.dtype

    @property
    def family(self) -> ModelFamily:
        return SDXL if getattr(self.pipeline, "text_encoder_2", None) is not None else SD15

    @property
    def cross_attention_dim(self) -> int:
        return int(self.pipeline.unet.config.cross_attention_dim)

    @classmethod
    def load(
        cls,
        model_id: str,
        cache_dir: Path,
        device: str = "auto",
        levers: SpeedLevers | None = None,
        single_file_config: str = DEFAULT_MODEL_ID,
        dtype: str = "auto",
        kinds: Sequence[JobKind] = (),
        preview_vae: str | None = None,
        vae: str | None = None,
        **options: Any,
    ) -> "DiffusionRenderer":
        """`preview_vae`: a tiny autoencoder (hub id or directory, or "tiny") that decodes
        previews; None: a linear map fitted to the model's VAE. `vae`: a VAE (hub id or
        directory) in place of the model's own."""
        target = resolve_device(device)
        torch_dtype = resolve_dtype(dtype, target)
        source = model_source(model_id, cache_dir, single_file_config)
        pipeline = load_pipeline(source, torch_dtype, vae)
        pipeline.to(target)
        if _vae_overflows(pipeline, torch_dtype):
            # SDXL's own VAE overflows to NaN in float16 (its config says `force_upcast`): it is
            # kept in float32 for good, where diffusers' SDXL pipeline casts it there and back
            # at every decode. A VAE fixed for float16 (T2I_VAE_ID) stays in float16.
            pipeline.vae.to(torch.float32)
            log.info("the VAE stays in float32: it overflows in float16 (force_upcast)")
        pipeline.set_progress_bar_config(disable=True)
        log.info("loaded %s on %s (%s)", model_id, target, torch_dtype)
        if preview_vae is not None:
            options["preview_vae"] = load_preview_vae(preview_vae, cache_dir, torch_dtype, target)
        renderer = cls(pipeline, model_name=model_id, kinds=kinds, **options)
        if levers is not None:
            renderer.apply(levers, cache_dir / "inductor")
        return renderer

    def apply(self, levers: SpeedLevers, compile_cache_dir: Path | None = None) -> None:
        """Turn levers on; call once, before warming up (the UNet compiles at its first call)."""
        if levers.channels_last:
            self.pipeline.unet.to(memory_format=torch.channels_last)
        if levers.channels_last or levers.vae_channels_last:
            self.pipeline.vae.to(memory_format=torch.channels_last)
        if levers.fuse_qkv:
            self.pipeline.fuse_qkv_projections()
        if levers.unet_quant is not None:
            # After fusing, so the fused projections are quantized as one layer.
            quantize_unet(self.pipeline.unet, levers.unet_quant, self.device)
        if levers.cudnn_benchmark:
            torch.backends.cudnn.benchmark = True
        if levers.deepcache_interval < 0:
            raise ValueError(f"deepcache_interval must be 0 or more: {levers.deepcache_interval}")
        if levers.deepcache_interval > 1:
            unsupported = deepcache_unsupported(self.pipeline.unet)
            if unsupported is not None:
                raise LeverUnsupported(
                    f"feature reuse (T2I_DEEPCACHE_INTERVAL) cannot run on this model: "
                    f"{unsupported}; unset it"
                )
        if levers.compile and not self._unet.compiled:
            if compile_cache_dir is not None:
                _use_persistent_compile_cache(compile_cache_dir)
                self._render_cost_cache = RenderCostCache(compile_cache_dir / RENDER_COSTS_FILE)
                self._compile_cache_dir = compile_cache_dir
            self._unet.compile(levers.cuda_graphs, levers.compile_autotune)
        if levers.compile_vae:
            if compile_cache_dir is not None:
                _use_persistent_compile_cache(compile_cache_dir)
            self._vae_decode.compile()
        self.levers = replace(levers, cuda_graphs=levers.compile and levers.cuda_graphs)
        log.info("speed levers: %s", self.levers)

    def use_loras(self, registry: LoraRegistry, max_bytes: int, max_rank: int = 64) -> None:
        """Serve LoRA adapters from `registry` through slots of `max_rank`, keeping at most
        `max_bytes` of them read. Call after `apply` and before warming up: the slots are part
        of the graphs the UNet compiles."""
        if self.loras is not None and self.loras.max_rank == max_rank:
            self.loras.use_registry(registry, max_bytes)
            return
        self.loras = LoraSlots(
            self.pipeline.unet, self.text_encoders(), registry, max_bytes, max_rank
        )

    def text_encoders(self) -> dict[str, torch.nn.Module]:
        """The pipeline's text encoders by the names adapters give them: one for SD 1.5, two for
        SDXL."""
        names = ("text_encoder", "text_encoder_2")
        found = {name: getattr(self.pipeline, name, None) for name in names}
        return {name: encoder for name, encoder in found.items() if encoder is not None}

    @property
    def control_types(self) -> list[str]:
        return sorted(name for kind in self.kinds for name in getattr(kind, "control_types", []))

    def module_dtypes(self) -> dict[str, str]:
        """The dtype of each module a render uses, by name."""
        modules: dict[str, torch.nn.Module] = {
            "unet": self.pipeline.unet,
            "vae": self.pipeline.vae,
            **self.text_encoders(),
        }
        if self.preview_vae is not None:
            modules["preview_vae"] = self.preview_vae
        for kind in self.kinds:
            modules.update(kind.modules())
        return {name: dtype_name(module.dtype) for name, module in sorted(modules.items())}

    @property
    def compiled_variants(self) -> set[tuple[bool, bool]]:
        """The UNet graphs warmed, as (LoRA slots on, ControlNet residuals) pairs; with feature
        reuse, its graphs stand for the variants without residuals."""
        reuse = {(key[-2], False) for key in self._unet.warmed_reuse}
        return {(key[-2], key[-1]) for key in self._unet.warmed} | reuse

    @property
    def recompiles(self) -> int:
        """Graphs compiled since the warm-up ended: 0 when every render found its graph."""
        if self._graphs_when_warm is None:
            return 0
        return compiled_graphs() - self._graphs_when_warm

    def scheduler(self, name: Scheduler) -> Any:
        if name not in self._schedulers:
            scheduler_class, overrides = _SCHEDULERS[name]
            self._schedulers[name] = _on_host(scheduler_class).from_config(
                self._base_scheduler_config, **overrides
            )
        return self._schedulers[name]

    def _kind(self, batch: RenderBatch) -> JobKind:
        for kind in self.kinds:
            if kind.accepts(batch):
                return kind
        raise ValueError("this worker serves no job kind for this batch")

    def _activate_adapters(self, loras: AdapterSet) -> None:
        if self.loras is not None:
            self.loras.activate(loras)
        elif loras:
            raise UnknownAdapter("this worker serves no LoRA adapters (T2I_LORA_DIR is unset)")

    @torch.inference_mode()
    def render(
        self,
        batch: RenderBatch,
        on_step: StepCallback | None = None,
        on_preview: PreviewCallback | None = None,
    ) -> RenderedImages:
        """One denoising loop for the whole batch; image i depends only on item i and the
        batch's shared settings. An image whose pixels came out non-finite is a NonFiniteImage.
        Items that ask for a preview get one through `on_preview` at the steps they ask for,
        once each such step has finished on the device."""
        self._activate_adapters(batch.loras)
        try:
            return self._render(batch, on_step, on_preview)
        finally:
            SLOTS.on = False

    def _render(
        self,
        batch: RenderBatch,
        on_step: StepCallback | None,
        on_preview: PreviewCallback | None = None,
    ) -> RenderedImages:
        kind = self._kind(batch)
        scheduler = self.scheduler(batch.scheduler)
        chunks = self.prompt_chunks(batch)
        items = self._pad(batch, chunks)
        host, stepping = self._generators(items)
        conditioning = self._conditioning(items, chunks, batch)
        plan = kind.start(Start(self, batch, items, scheduler, host))
        latents = self._denoise(plan, conditioning, scheduler, stepping, batch, on_step, on_preview)
        pixels = self.decode(latents)
        if plan.finish is not None:
            pixels = plan.finish(pixels)
        return to_images(pixels[: len(batch.items)])

    def _denoise(
        self,
        plan: Denoising,
        conditioning: Conditioning,
        scheduler: Any,
        generators: list[torch.Generator],
        batch: RenderBatch,
        on_step: StepCallback | None,
        on_preview: PreviewCallback | None = None,
    ) -> torch.Tensor:
        steps = StepReporter(self.device, on_step, len(plan.timesteps), on_preview)
        # The batch's own items that ask for previews (never the padding); none without a
        # callback, and then nothing below runs for previews.
        asks = {
            index: item.preview
            for index, item in enumerate(batch.items)
            if item.preview is not None and on_preview is not None
        }
        step_arguments = _step_arguments(scheduler, generators)
        unet = self.pipeline.unet
        latents = plan.latents
        # A kind that adds UNet inputs (ControlNet's residuals, into every skip) runs every step
        # whole: reusing features would drop its contribution to the deep path.
        interval = self.levers.deepcache_interval if plan.unet_inputs is None else 0
        embeddings = conditioning.embeddings
        total = len(plan.timesteps)
        features: torch.Tensor | None = None
        for index, timestep in enumerate(plan.timesteps):
            on_device = _timestep_on(self.device, timestep)
            model_input = torch.cat([latents] * 2) if batch.guided else latents
            model_input = scheduler.scale_model_input(model_input, timestep)
            if interval > 1:
                if features is None or deepcache_full_step(index, total, interval):
                    output, features = self._unet.deep(model_input, on_device, embeddings)
                    if self.levers.cuda_graphs:
                        # The graph's next replay overwrites its outputs; the shallow steps
                        # read these features after it.
                        features = features.clone()
                else:
                    output = self._unet.shallow(model_input, on_device, embeddings, features)
            else:
                extra = (
                    {}
                    if plan.unet_inputs is None
                    else plan.unet_inputs(model_input, on_device, conditioning)
                )
                output = unet(
                    model_input,
                    on_device,
                    **conditioning.unet_arguments(),
                    return_dict=False,
                    **extra,
                )[0]
            if batch.guided:
                unconditional, conditional = output.chunk(2)
                noise = unconditional + batch.guidance_scale * (conditional - unconditional)
            elif self.levers.cuda_graphs:
                # A CUDA graph's output is overwritten by its next replay, and multistep
                # schedulers (PNDM, DPM-Solver) keep earlier outputs: keep a copy instead.
                noise = output.clone()
            else:
                noise = output
            latents = scheduler.step(noise, timestep, latents, **step_arguments, return_dict=False)[
                0
            ]
            if latents.dtype != self.dtype:
                latents = latents.to(self.dtype)
            if plan.after_step is not None:
                latents = plan.after_step(index, latents)
            due = [row for row, ask in asks.items() if ask.due(index + 1)] if asks else []
            steps.step_end(self._previews(latents, due, asks, batch) if due else None)
        steps.finish()
        return latents

    def _previews(
        self,
        latents: torch.Tensor,
        rows: list[int],
        asks: dict[int, PreviewAsk],
        batch: RenderBatch,
    ) -> PendingPreviews:
        """Queue the previews of the items at `rows` (in order) from their latents: made 8-bit
        RGB on the device (by the linear map at latent resolution, or decoded by the tiny
        autoencoder and averaged down to the largest preview asked), and on CUDA copied to
        pinned host memory without waiting. The images are made by the returned function, to be
        called once the step has finished on the device; only then are the host bytes
        complete."""
        if rows == list(range(rows[0], rows[-1] + 1)):
            chosen = latents[rows[0] : rows[-1] + 1]
        else:
            # Slices and a concatenation: indexing with a list would copy it to the device.
            chosen = torch.cat([latents[row : row + 1] for row in rows])
        sizes = {row: asks[row].size(batch.width, batch.height) for row in rows}
        if self.preview_vae is not None:
            rgb = self._preview_decode(chosen, max(sizes.values(), key=lambda s: s[0] * s[1]))
        else:
            weight, bias = self._preview_map()
            rgb = torch.einsum("bchw,cd->bhwd", chosen.float(), weight) + bias
        as_bytes = (rgb.clamp(0, 1) * 255).round().to(torch.uint8)
        if as_bytes.device.type == "cuda":
            host = torch.empty(as_bytes.shape, dtype=torch.uint8, pin_memory=True)
            host.copy_(as_bytes, non_blocking=True)
        else:
            host = as_bytes.cpu()

        def images() -> dict[int, Image]:
            arrays = host.numpy()
            return {
                row: PILImage.fromarray(array).resize(sizes[row], PILImage.Resampling.BOX)
                for row, array in zip(rows, arrays, strict=True)
            }

        return images

    def _preview_decode(self, latents: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """`latents` decoded by the tiny autoencoder, as RGB in [0, 1] (float32, batch x height
        x width x colour), averaged down to `size` (width, height) where the decode is larger.

        The latents go in as diffusers' pipelines hand a VAE swapped for an AutoencoderTiny:
        divided by its own `scaling_factor` (1.0 for TAESD), not the model VAE's (0.18215 for
        SD 1.5): TAESD was trained on the diffusion model's latents as they are, already
        scaled. Its decoder clamps them itself and gives pixels in [-1, 1]."""
        vae = self.preview_vae
        assert vae is not None
        scaled = latents.to(vae.dtype) / vae.config.scaling_factor
        pixels = vae.decode(scaled, return_dict=False)[0].float()
        width, height = size
        if pixels.shape[-1] > width or pixels.shape[-2] > height:
            pixels = torch.nn.functional.adaptive_avg_pool2d(pixels, (height, width))
        return (pixels / 2 + 0.5).permute(0, 2, 3, 1)

    def _preview_map(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The linear map from latents to RGB in [0, 1] (a weight per latent channel and colour,
        and a bias per colour, float32 on the device), fitted at the first preview by least
        squares against the model's own VAE: a few random latents decoded, their pixels
        averaged over the VAE's scale (one latent pixel's block). Fits any VAE roughly; a VAE
        whose decode is linear (the tiny model's) exactly."""
        if self._preview_weights is not None:
            return self._preview_weights
        vae = self.pipeline.vae
        channels = vae.config.latent_channels
        generator = torch.Generator("cpu").manual_seed(0)
        latents = torch.randn((2, channels, 16, 16), generator=generator)
        on_device = latents.to(self.device, vae.dtype)
        decoded = vae.decode(on_device / vae.config.scaling_factor, return_dict=False)[0]
        # Not clamped: the map is fitted where the decoder is linear, and clamped when applied.
        pixels = torch.nn.functional.avg_pool2d(
            decoded.float() / 2 + 0.5, self.pipeline.vae_scale_factor
        )
        inputs = on_device.float().cpu().permute(0, 2, 3, 1).reshape(-1, channels)
        targets = pixels.cpu().permute(0, 2, 3, 1).reshape(-1, pixels.shape[1])
        design = torch.cat([inputs, torch.ones(len(inputs), 1)], dim=1)
        solution = torch.linalg.lstsq(design, targets).solution
        residual = (design @ solution - targets).square().mean().sqrt()
        log.info("preview map fitted to the VAE; RMS residual %.4f of full scale", residual)
        weight, bias = solution[:channels], solution[channels]
        self._preview_weights = (weight.to(self.device), bias.to(self.device))
        return self._preview_weights

    def _generators(
        self, items: Sequence[RenderItem]
    ) -> tuple[list[torch.Generator], list[torch.Generator]]:
        """Each image's generators: one on the host for its starting noise (so a seed gives the
        same latents on any device), and one for the noise added while stepping, on the device,
        where a host draw would cost a blocking copy per step. On a CPU they are one."""
        host = [torch.Generator("cpu").manual_seed(item.seed) for item in items]
        if self.device.type == "cpu":
            return host, host
        return host, [torch.Generator(self.device).manual_seed(item.seed) for item in items]

    def noise(self, shape: Sequence[int], generators: list[torch.Generator]) -> torch.Tensor:
        """Noise drawn from each image's host generator, on the device in the core's dtype."""
        return randn_tensor(
            tuple(shape), generator=generators, device=self.device, dtype=self.dtype
        )

    def latent_shape(self, count: int, width: int, height: int) -> tuple[int, int, int, int]:
        scale = self.pipeline.vae_scale_factor
        return (count, self.pipeline.unet.config.in_channels, height // scale, width // scale)

    def timesteps(self, scheduler: Any, steps: int, strength: float | None = None) -> torch.Tensor:
        """Set the scheduler up for `steps` steps and give the timesteps to run: all of them, or
        for a start from an image, the last `strength` of them."""
        scheduler.set_timesteps(steps)
        if strength is None:
            return scheduler.timesteps
        start = steps - min(int(steps * strength), steps)
        begin = start * scheduler.order
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(begin)
        return scheduler.timesteps[begin:]

    @staticmethod
    def noise_coefficients(scheduler: Any, timestep: torch.Tensor) -> tuple[float, float]:
        """(a, b) such that the scheduler's `add_noise(x, noise, timestep)` is `a*x + b*noise`,
        computed on the host: every scheduler adds noise linearly, and computing it on the
        device would copy the schedule there (a blocking copy) each time."""
        at = timestep.reshape(1)
        one, zero = torch.ones(1), torch.zeros(1)
        signal = float(scheduler.add_noise(one, zero, at)[0])
        noise = float(scheduler.add_noise(zero, one, at)[0])
        return signal, noise

    def encode_images(
        self, pixels: torch.Tensor, generators: list[torch.Generator]
    ) -> torch.Tensor:
        """Images in [-1, 1] as latents, each sampled with its own host generator."""
        vae = self.pipeline.vae
        distribution = vae.encode(pixels.to(self.device, vae.dtype)).latent_dist
        draws = torch.cat(
            [
                randn_tensor(
                    distribution.mean[index : index + 1].shape,
                    generator=generator,
                    device=self.device,
                    dtype=vae.dtype,
                )
                for index, generator in enumerate(generators)
            ]
        )
        latents = distribution.mean + distribution.std * draws
        return (latents * vae.config.scaling_factor).to(self.dtype)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents as pixels in [0, 1], decoded in slices of at most `decode_slice_pixels`."""
        vae = self.pipeline.vae
        scale = self.pipeline.vae_scale_factor
        image_pixels = latents.shape[2] * latents.shape[3] * scale * scale
        per_slice = max(1, self.decode_slice_pixels // image_pixels)
        pixels = self._vae_decode((latents / vae.config.scaling_factor).to(vae.dtype), per_slice)
        return (pixels / 2 + 0.5).clamp(0, 1)

    def _conditioning(
        self, items: Sequence[RenderItem], chunks: int, batch: RenderBatch
    ) -> Conditioning:
        """The UNet's conditioning: the prompts' embeddings, after the negative prompts' when
        guided; for SDXL also the pooled embeddings and the size ids, in the same order.

        An SDXL model whose config says `force_zeros_for_empty_prompt` (SDXL base does) takes an
        empty negative prompt as zeros, not as the encoding of "", as diffusers' SDXL pipelines
        do when given no negative prompt."""
        prompts, pooled = self._encode_in_chunks([item.prompt for item in items], chunks)
        if batch.guided:
            negatives, negatives_pooled = self._encode_in_chunks(
                [item.negative_prompt for item in items], chunks
            )
            if self.family is SDXL and self.pipeline.config.get("force_zeros_for_empty_prompt"):
                empty = torch.tensor(
                    [item.negative_prompt == "" for item in items], device=self.device
                )
                negatives = negatives.masked_fill(empty[:, None, None], 0)
                if negatives_pooled is not None:
                    negatives_pooled = negatives_pooled.masked_fill(empty[:, None], 0)
            embeddings = torch.cat([negatives, prompts])
            if pooled is not None and negatives_pooled is not None:
                pooled = torch.cat([negatives_pooled, pooled])
        else:
            embeddings = prompts
        if pooled is None:
            return Conditioning(embeddings)
        # SDXL's micro-conditioning: the image's original size, the crop's top left corner and
        # the target size; a render is an uncropped image at its own size.
        height, width = batch.height, batch.width
        size_ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=embeddings.dtype)
        time_ids = size_ids.to(self.device).repeat(len(embeddings), 1)
        return Conditioning(embeddings, {"text_embeds": pooled, "time_ids": time_ids})

    def _token_ids(self, text: str) -> list[int]:
        with self._counting_lock:
            return self._counting_tokenizer(text, add_special_tokens=False).input_ids

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

    def _encode_in_chunks(
        self, texts: list[str], chunks: int
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Each text as `chunks` CLIP windows of BOS + 75 tokens + EOS, encoded separately and
        joined along the sequence: long prompts are not truncated (as popular SD UIs do it). One
        window is exactly what diffusers' own prompt encoding gives.

        SD 1.5: the text encoder's last hidden states, and no pooled embedding. SDXL: both text
        encoders' penultimate hidden states side by side, and the second encoder's projected
        pooled embedding of each text's first window (as popular SDXL UIs pool long prompts)."""
        ids = [self._token_ids(text) for text in texts]
        if self.family is not SDXL:
            hidden = self.pipeline.text_encoder(self._windows(self.pipeline.tokenizer, ids, chunks))
            return self._joined(hidden[0], len(texts), chunks), None
        pipeline = self.pipeline
        first = pipeline.text_encoder(
            self._windows(pipeline.tokenizer, ids, chunks), output_hidden_states=True
        )
        second = pipeline.text_encoder_2(
            self._windows(pipeline.tokenizer_2, ids, chunks), output_hidden_states=True
        )
        hidden = torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1)
        pooled = second.text_embeds.reshape(len(texts), chunks, -1)[:, 0]
        return self._joined(hidden, len(texts), chunks).to(self.dtype), pooled.to(self.dtype)

    def _windows(self, tokenizer: Any, ids: list[list[int]], chunks: int) -> torch.Tensor:
        """The token ids of each text's `chunks` windows, each padded with `tokenizer`'s own
        padding token (SDXL's second tokenizer pads with "!", not with EOS)."""
        rows: list[list[int]] = []
        for text_ids in ids:
            for chunk in range(chunks):
                part = text_ids[chunk * CHUNK_TOKENS : (chunk + 1) * CHUNK_TOKENS]
                padding = [tokenizer.pad_token_id] * (CHUNK_TOKENS - len(part))
                rows.append([tokenizer.bos_token_id, *part, tokenizer.eos_token_id, *padding])
        return torch.tensor(rows, device=self.device)

    @staticmethod
    def _joined(hidden: torch.Tensor, texts: int, chunks: int) -> torch.Tensor:
        """Each text's windows one after the other along the sequence."""
        return hidden.reshape(texts, chunks * hidden.shape[1], hidden.shape[2])

    def _pad(self, batch: RenderBatch, chunks: int) -> tuple[RenderItem, ...]:
        """The batch's items, padded up to a compiled image count where warm-up measured that to
        be faster than rendering them as they are, within the pixel cap. Padding repeats the
        last item (its input images too) with empty prompts: each image depends only on its own
        item, so the batch's own images do not change."""
        compiled = self._compiled_counts.get((batch.width, batch.height), set())
        variant = (bool(batch.loras), batch.control_type is not None)
        if not batch.guided or chunks > 1 or not compiled or variant not in self.compiled_variants:
            # No compiled graph serves these shapes: padding would only cost.
            return batch.items
        if self.max_batch_pixels is not None:
            fits = self.max_batch_pixels // (batch.width * batch.height)
            compiled = {count for count in compiled if count <= fits}
        count = len(batch.items)
        costs = self.render_costs.get((batch.width, batch.height), {})
        padding = cheapest_count(count, costs, compiled) - count
        filler = replace(batch.items[-1], prompt="", negative_prompt="", seed=0, preview=None)
        return batch.items + (filler,) * padding

    def warm_up(
        self,
        width: int | None = None,
        height: int | None = None,
        compiled_counts: Iterable[int] = (1,),
        max_images: int = 1,
    ) -> list[Callable[[], object]]:
        """Renders so the first job pays no start-up cost. With a compiled UNet: compile (and
        record CUDA graphs) for each of `compiled_counts`, in each variant the worker serves
        (plain, LoRA slots on, a kind's own such as ControlNet), then time a render of every
        image count up to `max_images`, so a batch is padded only where that is faster. CUDA
        graphs belong to the thread that records them: call this on the thread that will render.

        Returns the renders left for idle time: when the timings are cached from an earlier start
        on the same card, software and settings, the counts that are not compiled are warmed
        (their first render selects kernels) only while no job waits."""
        size = self.family.default_size
        try:
            return self._warm_up(width or size, height or size, compiled_counts, max_images)
        finally:
            self._graphs_when_warm = compiled_graphs()

    def _variants(self, count: int, width: int, height: int) -> list[Callable[[], object]]:
        """One render per UNet graph that a batch of `count` images may need."""
        plain = _warm_up_batch(count, width, height)
        renders: list[Callable[[], object]] = [partial(self.render, plain)]
        if self.loras is not None:
            renders.append(partial(self._render_with_slots_on, plain))
        for kind in self.kinds:
            own = kind.warm_up_batch(count, width, height)
            if own is not None:
                renders.append(partial(self.render, own))
        return renders

    @torch.inference_mode()
    def _render_with_slots_on(self, batch: RenderBatch) -> RenderedImages:
        assert self.loras is not None
        with self.loras.on():
            return self._render(batch, None, None)

    def _warm_up(
        self, width: int, height: int, compiled_counts: Iterable[int], max_images: int
    ) -> list[Callable[[], object]]:
        if not self._unet.compiled:
            with self._warming():
                self.render(_warm_up_batch(1, width, height))
            return []
        if self.levers.cuda_graphs:
            _cuda_graph_trees_on_this_thread()
        compiled = sorted(set(compiled_counts))
        artifacts = self._compile_artifacts(width, height, compiled)
        if artifacts is not None:
            started = time.perf_counter()
            artifacts.load()
            self.warm_up_seconds["load compile artifacts"] = time.perf_counter() - started
        self._compile_counts(compiled[:1], width, height)
        counts = range(1, max(max_images, *compiled) + 1)
        fingerprint = self._warm_up_fingerprint(width, height, compiled, max_images)
        cache = self._render_cost_cache
        cached = cache.get(fingerprint) if cache is not None else None
        if cached is not None and set(cached) == set(counts):
            if artifacts is not None and artifacts.loaded:
                # A restart with every cache warm: the other counts' graphs come from the caches
                # in seconds each, so they compile while no job waits, one render at a time, and
                # a job that comes meanwhile waits for one graph, not all of them.
                later = self._compile_in_idle_time(compiled[1:], width, height)
            else:
                self._compile_counts(compiled[1:], width, height)
                self._save_compile_artifacts(artifacts)
                later = []
            self.render_costs[(width, height)] = cached
            log.info("warm-up render seconds by image count from %s: %s", cache, cached)
            return later + [
                partial(self.render, _warm_up_batch(count, width, height))
                for count in counts
                if count not in compiled
            ]
        self._compile_counts(compiled[1:], width, height)
        self._save_compile_artifacts(artifacts)
        started = time.perf_counter()
        costs: dict[int, float] = {}
        for count in counts:
            batch = _warm_up_batch(count, width, height)
            if count not in compiled:
                self.render(batch)  # the first render of a shape pays for kernel selection
            costs[count] = self._timed_render(batch)
        self.render_costs[(width, height)] = costs
        if cache is not None:
            cache.put(fingerprint, costs)
        self.warm_up_seconds["time every count"] = time.perf_counter() - started
        log.info("warm-up render seconds by image count at %dx%d: %s", width, height, costs)
        log.info("warm-up phases in seconds: %s", self.warm_up_seconds)
        return []

    @contextlib.contextmanager
    def _warming(self) -> Iterator[None]:
        """The shapes rendered meanwhile run compiled from now on (UNet and VAE, where compiled)."""
        self._unet.warming = self._vae_decode.warming = True
        try:
            yield
        finally:
            self._unet.warming = self._vae_decode.warming = False

    def _warm_up_fingerprint(
        self, width: int, height: int, compiled: list[int], max_images: int
    ) -> str:
        """What the warm-up timings depend on: the card, the software, the model and levers."""
        facts = {
            **self._set_up_facts(width, height, compiled),
            "torch": torch.__version__,
            "variants": sorted(self.compiled_variants),
            "max_images": max_images,
        }
        return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()

    def _compile_counts(self, counts: list[int], width: int, height: int) -> None:
        """Compile (and record CUDA graphs) for each of `counts`, in every variant served."""
        with self._warming():
            for count in counts:
                started = time.perf_counter()
                for render in self._variants(count, width, height):
                    render()
                self.warm_up_seconds[f"compile {count}"] = time.perf_counter() - started
        self._compiled_counts.setdefault((width, height), set()).update(counts)

    def _save_compile_artifacts(self, artifacts: CompileArtifacts | None) -> None:
        if artifacts is not None:
            started = time.perf_counter()
            artifacts.save_if_new()
            self.warm_up_seconds["save compile artifacts"] = time.perf_counter() - started

    def _compile_in_idle_time(
        self, counts: list[int], width: int, height: int
    ) -> list[Callable[[], object]]:
        """One warm-up render per graph of `counts`, to run after the warm-up: a count serves
        batches once all of its variants are compiled, and its graphs are not recompiles."""

        def compile_one(render: Callable[[], object], count: int, last: bool) -> None:
            graphs_before = compiled_graphs()
            try:
                with self._warming():
                    render()
            finally:
                if self._graphs_when_warm is not None:
                    self._graphs_when_warm += compiled_graphs() - graphs_before
            if last:
                self._compiled_counts.setdefault((width, height), set()).add(count)

        pieces: list[Callable[[], object]] = []
        for count in counts:
            renders = self._variants(count, width, height)
            for index, render in enumerate(renders):
                pieces.append(partial(compile_one, render, count, index == len(renders) - 1))
        return pieces

    def _compile_artifacts(
        self, width: int, height: int, compiled: list[int]
    ) -> CompileArtifacts | None:
        """torch's portable compile artifacts of this warm-up, named by what its graphs depend
        on: the card, the model and dtype, the levers, the variants served and the shapes."""
        if self._compile_cache_dir is None:
            return None
        facts = {
            **self._set_up_facts(width, height, compiled),
            "kinds": sorted(type(kind).__name__ for kind in self.kinds),
            "control_types": self.control_types,
        }
        return CompileArtifacts(self._compile_cache_dir, facts)

    def _set_up_facts(self, width: int, height: int, compiled: list[int]) -> dict[str, Any]:
        """The card, model, dtype, levers, adapter slots and shapes a warm-up worked on."""
        device = self.device
        return {
            "card": torch.cuda.get_device_name(device) if device.type == "cuda" else device.type,
            "diffusers": diffusers.__version__,
            "model": self.model_name,
            "dtype": str(self.dtype),
            "levers": asdict(self.levers),
            "lora_rank": None if self.loras is None else self.loras.max_rank,
            "size": [width, height],
            "compiled": compiled,
        }

    def _timed_render(self, batch: RenderBatch) -> float:
        _synchronize(self.device)
        started = time.perf_counter()
        self.render(batch)
        _synchronize(self.device)
        return time.perf_counter() - started


def _step_arguments(scheduler: Any, generators: list[torch.Generator]) -> dict[str, Any]:
    """What the scheduler's step takes beside the model output: the generators of ancestral
    schedulers."""
    if "generator" in inspect.signature(scheduler.step).parameters:
        return {"generator": generators}
    return {}


class RenderCostCache:
    """Warm-up render timings kept beside the compile cache, by fingerprint, so a restart on the
    same card skips timing every image count before it takes jobs."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __str__(self) -> str:
        return str(self.path)

    def _read(self) -> dict[str, dict[str, float]]:
        try:
            entries = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        return entries if isinstance(entries, dict) else {}

    def get(self, fingerprint: str) -> dict[int, float] | None:
        entry = self._read().get(fingerprint)
        if not isinstance(entry, dict):
            return None
        try:
            return {int(count): float(seconds) for count, seconds in entry.items()}
        except (TypeError, ValueError):
            return None

    def put(self, fingerprint: str, costs: dict[int, float]) -> None:
        entries = self._read()
        entries[fingerprint] = {str(count): seconds for count, seconds in costs.items()}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Written whole and renamed, so a worker starting beside this one never reads half a file.
        partial_path = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
        partial_path.write_text(json.dumps(entries, indent=1))
        partial_path.replace(self.path)


def _cuda_graph_trees_on_this_thread() -> None:
    """Inductor keeps its CUDA graph trees per thread. Before torch 2.13 it set that state up only
    on the thread that imported it (and autograd's threads), and asserted on any other."""
    from torch._inductor import cudagraph_trees

    local = cudagraph_trees.local
    if hasattr(local, "tree_manager_containers"):
        return
    if torch._C._is_key_in_tls("tree_manager_containers"):
        return
    local.tree_manager_containers = {}
    local.tree_manager_locks = defaultdict(threading.Lock)
    torch._C._stash_obj_in_tls("tree_manager_containers", local.tree_manager_containers)
    torch._C._stash_obj_in_tls("tree_manager_locks", local.tree_manager_locks)


def _warm_up_batch(count: int, width: int, height: int) -> RenderBatch:
    return RenderBatch(
        items=tuple(RenderItem("warm-up", "", index) for index in range(count)),
        width=width,
        height=height,
        num_inference_steps=WARM_UP_STEPS,
        guidance_scale=7.5,
        scheduler="dpmpp_2m",
    )


def to_images(pixels: torch.Tensor) -> RenderedImages:
    """The decoder's output in [0, 1] as 8-bit images, converted on the device so one small copy
    reaches the host; the same rounding as diffusers' own conversion."""
    finite = torch.isfinite(pixels).flatten(1).all(dim=1)
    as_bytes = (pixels.float().permute(0, 2, 3, 1) * 255).round().to(torch.uint8)
    arrays, finite_flags = as_bytes.cpu().numpy(), finite.cpu().tolist()
    return [
        PILImage.fromarray(array) if ok else NonFiniteImage()
        for array, ok in zip(arrays, finite_flags, strict=True)
    ]
