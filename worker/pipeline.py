"""The diffusers pipeline: load once, render batches. Knows nothing of Celery, Redis or S3."""

import copy
import hashlib
import json
import logging
import math
import os
import threading
import time
from collections import defaultdict, deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import diffusers
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
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image as PILImage
from PIL.Image import Image

from shared.loras import LoraRegistry
from shared.schema import GenerationRequest, Scheduler
from shared.settings import DEFAULT_MODEL_ID
from worker.adapters import AdapterSet, LoraAdapters, UnknownAdapter
from worker.models import load_pipeline, model_source

if TYPE_CHECKING:
    from worker.conditioned import ImageConditionedRenderer
    from worker.controlnet import ControlNetRenderer

log = logging.getLogger(__name__)

# Called after each denoising step has finished on the device, with (steps done, total steps).
StepCallback = Callable[[int, int], None]


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


class NonFiniteImage(Exception):
    """The decoder produced NaN or infinite pixels (an fp16 overflow): the image would be black."""

    def __init__(self) -> None:
        super().__init__(
            "the image came out with NaN or infinite pixels (a numerical overflow on the GPU); "
            "another seed or fewer guidance usually renders"
        )


# One entry per image of a batch: the image, or why it has none.
RenderedImages = list[Image | NonFiniteImage]


@dataclass(frozen=True)
class RenderItem:
    """One image: its own prompt, negative prompt and seed, and for image-to-image its starting
    image (and for inpainting its mask), or for ControlNet its control map."""

    prompt: str
    negative_prompt: str
    seed: int
    init_image: Image | None = None
    mask_image: Image | None = None
    control_image: Image | None = None


@dataclass(frozen=True)
class RenderBatch:
    """Images that share one pipeline call: same size, steps, scheduler and guidance."""

    items: tuple[RenderItem, ...]
    width: int
    height: int
    num_inference_steps: int
    guidance_scale: float
    scheduler: Scheduler
    # Image-to-image and inpainting: how far from the starting images; None for text-to-image.
    strength: float | None = None
    # LoRA adapters and their scales, sorted by name; () for none.
    loras: AdapterSet = ()
    # ControlNet: the control type and how strongly it conditions; None without control.
    control_type: str | None = None
    control_scale: float = 1.0

    @classmethod
    def from_request(
        cls,
        request: GenerationRequest,
        init_image: Image | None = None,
        mask_image: Image | None = None,
        control_image: Image | None = None,
    ) -> "RenderBatch":
        items = tuple(
            RenderItem(
                request.prompt, request.negative_prompt, seed, init_image, mask_image, control_image
            )
            for seed in request.image_seeds()
        )
        control = request.control
        return cls(
            items=items,
            width=request.width,
            height=request.height,
            num_inference_steps=request.num_inference_steps,
            guidance_scale=request.guidance_scale,
            scheduler=request.scheduler,
            strength=None if init_image is None else request.image_strength,
            loras=adapter_set(request),
            control_type=None if control is None else control.type,
            control_scale=1.0 if control is None else control.conditioning_scale,
        )

    @property
    def inpainting(self) -> bool:
        return self.items[0].mask_image is not None

    @property
    def guided(self) -> bool:
        """Classifier-free guidance: the UNet sees each image twice (with and without prompt)."""
        return self.guidance_scale > 1


def adapter_set(request: GenerationRequest) -> AdapterSet:
    """The request's adapters as a batch holds them: sorted, so the order named never matters."""
    return tuple(sorted((lora.name, lora.scale) for lora in request.loras))


@dataclass(frozen=True)
class SpeedLevers:
    """Optional speed-ups of the warm pipeline; all off is plain diffusers (SDPA attention)."""

    compile: bool = False
    cuda_graphs: bool = False
    fuse_qkv: bool = False
    channels_last: bool = False
    cudnn_benchmark: bool = False

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


class StepReporter:
    """Hands `on_step` each denoising step once it has finished on the device: pass `step_end`
    as a pipeline's `callback_on_step_end`, and call `finish` after the call."""

    def __init__(self, device: torch.device, on_step: StepCallback | None, total: int) -> None:
        self._steps = FinishedSteps.on(device)
        self._on_step = on_step
        self._total = total

    def _report(self, finished: list[int]) -> None:
        if self._on_step is not None:
            for step in finished:
                self._on_step(step, self._total)

    def step_end(self, pipe: Any, step: int, timestep: Any, tensors: dict[str, Any]) -> dict:
        self._report(self._steps.launched())
        return tensors

    def finish(self) -> None:
        self._report(self._steps.rest())


def resized(image: Image, width: int, height: int) -> Image:
    if image.size == (width, height):
        return image
    return image.resize((width, height), PILImage.Resampling.LANCZOS)


class _UNetForward:
    """Stands in for the UNet's forward: timesteps reach the UNet as float32 on its device
    (schedulers feed int64 or float32, on the host), and once compiled, the shapes seen while
    warming run compiled and any other eager, so a request of a new size renders at once instead
    of waiting a minute for a compile."""

    def __init__(self, unet: torch.nn.Module) -> None:
        self._eager = unet.forward
        self._compiled: Callable[..., Any] | None = None
        self._warmed: set[tuple[Any, ...]] = set()
        self.warming = False
        # While LoRA adapters are in the UNet: its modules are not those the graphs were traced
        # from.
        self.eager_only = False
        unet.forward = self._forward

    @property
    def compiled(self) -> bool:
        return self._compiled is not None

    def compile(self, cuda_graphs: bool) -> None:
        mode = "reduce-overhead" if cuda_graphs else "default"
        self._compiled = torch.compile(self._eager, mode=mode, fullgraph=True, dynamic=False)
        # One graph per warmed shape; past the default limit of 8, dynamo would go eager silently.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)

    def _forward(self, sample: torch.Tensor, timestep: Any, *args: Any, **kwargs: Any) -> Any:
        # One timestep dtype means one compiled graph for every scheduler.
        timestep = _timestep_on(sample.device, timestep)
        if self._compiled is None or self.eager_only or _controlled(kwargs):
            return self._eager(sample, timestep, *args, **kwargs)
        shape = unet_input_shape(sample, kwargs.get("encoder_hidden_states"))
        if self.warming:
            self._warmed.add(shape)
        if shape in self._warmed:
            return self._compiled(sample, timestep, *args, **kwargs)
        return self._eager(sample, timestep, *args, **kwargs)


def _controlled(unet_arguments: dict[str, Any]) -> bool:
    """Whether ControlNet residuals come along: inputs the warmed graphs never saw."""
    return unet_arguments.get("down_block_additional_residuals") is not None


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


def _use_persistent_compile_cache(directory: Path) -> None:
    """Keep inductor's compiled kernels across restarts, so a restarted worker is ready fast."""
    directory.mkdir(parents=True, exist_ok=True)
    # Inductor reads its cache directory from the environment each time it looks it up.
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(directory))
    import torch._inductor.config as inductor_config

    inductor_config.fx_graph_cache = True
    # 1x1 convolutions as matrix products: cheaper on tensor cores, a common SD setting.
    inductor_config.conv_1x1_as_mm = True


# What must be equal for two jobs to share a pipeline call.
BatchKey = tuple[Any, ...]

# CLIP sees 77 tokens: BOS, 75 of the prompt, EOS. Longer prompts are encoded in 75-token chunks.
CHUNK_TOKENS = 75
# Denoising steps of each warm-up render: CUDA graph trees warm up, record, then replay.
WARM_UP_STEPS = 3
# Beside the compiled kernels in the compile cache directory.
RENDER_COSTS_FILE = "render-costs.json"


def batch_key(batch: RenderBatch) -> BatchKey:
    """Everything in a batch but its items (and whether its items bring images and masks)."""
    return (
        batch.width,
        batch.height,
        batch.num_inference_steps,
        batch.guidance_scale,
        batch.scheduler,
        batch.strength,
        batch.inpainting,
        batch.loras,
        batch.control_type,
        batch.control_scale,
    )


def resolve_device(requested: str) -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def limit_torch_threads(threads: int) -> None:
    """Hold this process's CPU rendering to `threads` threads (intra-op, and inter-op before any
    parallel work has started)."""
    torch.set_num_threads(threads)
    torch.set_num_interop_threads(threads)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class DiffusionRenderer:
    """A warm StableDiffusionPipeline on one device."""

    def __init__(self, pipeline: StableDiffusionPipeline, model_name: str) -> None:
        self.pipeline = pipeline
        self.model_name = model_name
        self.levers = SpeedLevers()
        self._base_scheduler_config = pipeline.scheduler.config
        self._schedulers: dict[Scheduler, Any] = {}
        self._unet = _UNetForward(pipeline.unet)
        # Per (width, height): the image counts compiled, and seconds of a warm-up render by image
        # count (what padding decides on).
        self._compiled_counts: dict[tuple[int, int], set[int]] = {}
        self.render_costs: dict[tuple[int, int], dict[int, float]] = {}
        # Where the start-up time went: compiling each image count, timing every count.
        self.warm_up_seconds: dict[str, float] = {}
        self._render_cost_cache: RenderCostCache | None = None
        self._from_images: ImageConditionedRenderer | None = None
        self.adapters: LoraAdapters | None = None
        self.controlnets: dict[str, Any] = {}
        self._controlled: ControlNetRenderer | None = None
        # Jobs count their prompts' tokens on their own threads while the GPU thread renders. A
        # tokenizer keeps the last call's padding and truncation as state, so a count made
        # during the pipeline's own tokenization could leave its negative prompt unpadded (or
        # pad the count): counting uses a private copy, one thread at a time.
        self._counting_tokenizer = copy.deepcopy(pipeline.tokenizer)
        # Counting is meant to run past the model's window: no warning that it does.
        self._counting_tokenizer.model_max_length = int(1e30)
        self._counting_lock = threading.Lock()

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
        single_file_config: str = DEFAULT_MODEL_ID,
    ) -> "DiffusionRenderer":
        target = resolve_device(device)
        dtype = torch.float16 if target.type == "cuda" else torch.float32
        source = model_source(model_id, cache_dir, single_file_config)
        pipeline = load_pipeline(source, dtype)
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
        if levers.cudnn_benchmark:
            torch.backends.cudnn.benchmark = True
        if levers.compile and not self._unet.compiled:
            if compile_cache_dir is not None:
                _use_persistent_compile_cache(compile_cache_dir)
                self._render_cost_cache = RenderCostCache(compile_cache_dir / RENDER_COSTS_FILE)
            self._unet.compile(levers.cuda_graphs)
        self.levers = replace(levers, cuda_graphs=levers.compile and levers.cuda_graphs)
        log.info("speed levers: %s", self.levers)

    def use_loras(self, registry: LoraRegistry, max_bytes: int) -> None:
        """Serve LoRA adapters from `registry`, keeping at most `max_bytes` of them loaded."""

        def set_unet_eager(eager: bool) -> None:
            self._unet.eager_only = eager

        if self.adapters is not None:
            self.adapters.activate(())
        self.adapters = LoraAdapters(self.pipeline, registry, max_bytes, set_unet_eager)

    def use_controlnets(self, controlnets: dict[str, Any]) -> None:
        """Serve these control types with these ControlNet models (on the pipeline's device)."""
        self.controlnets = dict(controlnets)

    @property
    def control_types(self) -> list[str]:
        return sorted(self.controlnets)

    def _activate_adapters(self, loras: AdapterSet) -> None:
        if self.adapters is not None:
            self.adapters.activate(loras)
        elif loras:
            raise UnknownAdapter("this worker serves no LoRA adapters (T2I_LORA_DIR is unset)")

    def scheduler(self, name: Scheduler) -> Any:
        if name not in self._schedulers:
            scheduler_class, overrides = _SCHEDULERS[name]
            self._schedulers[name] = _on_host(scheduler_class).from_config(
                self._base_scheduler_config, **overrides
            )
        return self._schedulers[name]

    @torch.inference_mode()
    def render(self, batch: RenderBatch, on_step: StepCallback | None = None) -> RenderedImages:
        """One pipeline call for the whole batch; image i depends only on item i and the batch's
        shared settings. An image whose pixels came out non-finite is a NonFiniteImage."""
        self._activate_adapters(batch.loras)
        if batch.control_type is not None:
            if self._controlled is None:
                # Imported here: it builds on this module.
                from worker.controlnet import ControlNetRenderer

                self._controlled = ControlNetRenderer(self)
            return self._controlled.render(batch, on_step)
        if batch.strength is not None:
            if self._from_images is None:
                # Imported here: it builds on this module.
                from worker.conditioned import ImageConditionedRenderer

                self._from_images = ImageConditionedRenderer(self)
            return self._from_images.render(batch, on_step)
        self.pipeline.scheduler = self.scheduler(batch.scheduler)
        steps = StepReporter(self.device, on_step, batch.num_inference_steps)
        chunks = self.prompt_chunks(batch)
        items = self._pad(batch, chunks)
        latents, step_generators = self._noise(items, batch)
        result = self.pipeline(
            **self.conditioning(items, chunks),
            width=batch.width,
            height=batch.height,
            num_inference_steps=batch.num_inference_steps,
            guidance_scale=batch.guidance_scale,
            latents=latents,
            generator=step_generators,
            output_type="pt",
            callback_on_step_end=steps.step_end,
        )
        steps.finish()
        return to_images(result.images[: len(batch.items)])

    def _noise(
        self, items: Sequence[RenderItem], batch: RenderBatch
    ) -> tuple[torch.Tensor, list[torch.Generator]]:
        """Each image's starting latents, and the generators for noise added while stepping.
        The starting noise comes from CPU generators, so a seed gives the same latents on any
        device; the noise ancestral schedulers add at each step comes from generators on the
        device, where a CPU draw would cost a blocking copy per step."""
        host = [torch.Generator("cpu").manual_seed(item.seed) for item in items]
        scale = self.pipeline.vae_scale_factor
        shape = (
            len(items),
            self.pipeline.unet.config.in_channels,
            batch.height // scale,
            batch.width // scale,
        )
        latents = randn_tensor(shape, generator=host, device=self.device, dtype=self.dtype)
        if self.device.type == "cpu":
            return latents, host
        on_device = [torch.Generator(self.device).manual_seed(item.seed) for item in items]
        return latents, on_device

    def conditioning(self, items: Sequence[RenderItem], chunks: int) -> dict[str, Any]:
        """The pipeline's prompt arguments: the texts, or their embeddings in 75-token chunks."""
        prompts = [item.prompt for item in items]
        negatives = [item.negative_prompt for item in items]
        if chunks == 1:
            return {"prompt": prompts, "negative_prompt": negatives}
        return {
            "prompt_embeds": self._encode_in_chunks(prompts, chunks),
            "negative_prompt_embeds": self._encode_in_chunks(negatives, chunks),
        }

    @property
    def dtype(self) -> torch.dtype:
        return self.pipeline.unet.dtype

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

    def _pad(self, batch: RenderBatch, chunks: int) -> tuple[RenderItem, ...]:
        """The batch's items, padded up to a compiled image count where warm-up measured that
        to be faster than rendering them as they are."""
        compiled = self._compiled_counts.get((batch.width, batch.height), set())
        if not batch.guided or chunks > 1 or not compiled:
            # No compiled graph serves these shapes: padding would only cost.
            return batch.items
        count = len(batch.items)
        costs = self.render_costs.get((batch.width, batch.height), {})
        padding = cheapest_count(count, costs, compiled) - count
        return batch.items + (RenderItem("", "", 0),) * padding

    def warm_up(
        self,
        width: int = 512,
        height: int = 512,
        compiled_counts: Iterable[int] = (1,),
        max_images: int = 1,
    ) -> list[Callable[[], object]]:
        """Renders so the first job pays no start-up cost. With a compiled UNet: compile (and
        record CUDA graphs) for each of `compiled_counts`, then time a render of every image
        count up to `max_images`, so a batch is padded only where that is faster. CUDA graphs
        belong to the thread that records them: call this on the thread that will render.

        Returns the renders left for idle time: when the timings are cached from an earlier start
        on the same card, software and settings, the counts that are not compiled are warmed
        (their first render selects kernels) only while no job waits."""
        if not self._unet.compiled:
            self.render(_warm_up_batch(1, width, height))
            return []
        if self.levers.cuda_graphs:
            _cuda_graph_trees_on_this_thread()
        compiled = sorted(set(compiled_counts))
        self._unet.warming = True
        try:
            for count in compiled:
                started = time.perf_counter()
                self.render(_warm_up_batch(count, width, height))
                self.warm_up_seconds[f"compile {count}"] = time.perf_counter() - started
        finally:
            self._unet.warming = False
        self._compiled_counts[(width, height)] = set(compiled)
        counts = range(1, max(max_images, *compiled) + 1)
        fingerprint = self._warm_up_fingerprint(width, height, compiled, max_images)
        cache = self._render_cost_cache
        cached = cache.get(fingerprint) if cache is not None else None
        if cached is not None and set(cached) == set(counts):
            self.render_costs[(width, height)] = cached
            log.info("warm-up render seconds by image count from %s: %s", cache, cached)
            return [
                partial(self.render, _warm_up_batch(count, width, height))
                for count in counts
                if count not in compiled
            ]
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

    def _warm_up_fingerprint(
        self, width: int, height: int, compiled: list[int], max_images: int
    ) -> str:
        """What the warm-up timings depend on: the card, the software, the model and levers."""
        device = self.device
        card = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
        facts = {
            "card": card,
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "model": self.model_name,
            "dtype": str(self.dtype),
            "levers": asdict(self.levers),
            "size": [width, height],
            "compiled": compiled,
            "max_images": max_images,
        }
        return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()

    def _timed_render(self, batch: RenderBatch) -> float:
        _synchronize(self.device)
        started = time.perf_counter()
        self.render(batch)
        _synchronize(self.device)
        return time.perf_counter() - started


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
