"""What the GPU benchmark and the GPU tests render with, built offline once in a cache directory:
SD 1.5's and SDXL base's architectures with random weights, LoRA adapters and a canny ControlNet
of SD 1.5's shapes (or the tiny model's own, when smoke-testing on a CPU), and each kind of job
with the pictures, masks and control maps it brings."""

import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image as PILImage
from PIL.Image import Image

from shared.families import ModelFamilyName
from shared.loras import LoraRegistry
from shared.schema import Scheduler
from worker.controlnet import TINY_CONTROLNET_ID, canny_map
from worker.kinds import load_renderer
from worker.pipeline import DiffusionRenderer, RenderBatch, RenderItem, SpeedLevers
from worker.tiny_customization import staged
from worker.tiny_model import ensure_tiny_model, ensure_tiny_xl_model

# Models, adapters and the compile cache; the GPU tests reuse them when the benchmark ran first.
DEFAULT_CACHE_DIR = Path(tempfile.gettempdir()) / "t2i-bench-cache"
PROMPT = "a lighthouse at dusk, oil painting, highly detailed"
GUIDANCE = 7.5
# The rank of the SD 1.5-sized adapters: what style adapters are commonly trained with.
SD15_LORA_RANK = 32
# T2I_LORA_MAX_RANK's default: the rank of the slots the worker installs.
LORA_MAX_RANK = 64
LORA_CACHE_BYTES = 256 * 2**20
# How far an adapter's product BA reaches, as a fraction of its layer's own weights: enough to
# change an image visibly without swamping it (as the tiny adapters do).
LORA_STRENGTH = 0.5
# Image-to-image and inpainting jobs keep this much of the schedule.
IMAGE_STRENGTH = 0.6
# The kinds of job, as the benchmark and the tests name them.
KINDS = ("plain", "lora", "image-to-image", "controlnet", "inpainting")
_SD15_ADAPTERS = {"random-style": 31, "random-other": 32}
_TINY_ADAPTERS = ("tiny-style", "tiny-other")


# The text encoders' sizes: CLIP ViT-L (SD 1.5's, and SDXL's first) and OpenCLIP ViT-bigG
# (SDXL's second, with its projection of the pooled text).
_CLIP_VIT_L = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "hidden_act": "quick_gelu",
}
_OPENCLIP_BIG_G = {
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_attention_heads": 20,
    "num_hidden_layers": 32,
    "hidden_act": "gelu",
    "projection_dim": 1280,
}


def _grown(tiny: Any, unet: dict[str, Any], vae: dict[str, Any]) -> dict[str, Any]:
    """The tiny pipeline's components grown to a real model's sizes, with random weights: its
    UNet and VAE from their configs with `unet` and `vae` changed, and each text encoder (one or
    two) at its real size. Only the tokenizers stay the tiny model's byte-level ones."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    torch.manual_seed(0)
    components = {
        **tiny.components,
        "unet": UNet2DConditionModel.from_config(tiny.unet.config, norm_num_groups=32, **unet),
        "vae": AutoencoderKL.from_config(
            tiny.vae.config,
            block_out_channels=(128, 256, 512, 512),
            layers_per_block=2,
            norm_num_groups=32,
            **vae,
        ),
    }
    sizes = {"text_encoder": _CLIP_VIT_L, "text_encoder_2": _OPENCLIP_BIG_G}
    for name, size in sizes.items():
        encoder = components.get(name)
        if encoder is not None:
            config = encoder.config.to_dict()
            config.update(size)
            components[name] = type(encoder)(type(encoder.config)(**config))
    return components


def _save(pipeline: Any, target: Path) -> Path:
    # Half the bytes to write and read back; every consumer loads it in fp16 anyway.
    pipeline.to(torch.float16).save_pretrained(target)
    return target


def build_sd15(target: Path, cache_dir: Path) -> Path:
    """SD 1.5's architecture (UNet, VAE, CLIP ViT-L text encoder) with random weights, saved as a
    diffusers directory: the tiny model's components grown to SD 1.5's sizes, so it has the real
    model's shapes and FLOPs and needs no hub. Only the tokenizer stays byte-level."""
    if (target / "model_index.json").is_file():
        return target
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    tiny = StableDiffusionPipeline.from_pretrained(ensure_tiny_model(cache_dir))
    unet = {
        "block_out_channels": (320, 640, 1280, 1280),
        "layers_per_block": 2,
        "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        "cross_attention_dim": 768,
        "attention_head_dim": 8,
    }
    components = _grown(tiny, unet, {"scaling_factor": 0.18215})
    # SD 1.5's default scheduler: its own PNDM configuration.
    components["scheduler"] = PNDMScheduler.from_config(
        tiny.scheduler.config, skip_prk_steps=True, set_alpha_to_one=False
    )
    return _save(StableDiffusionPipeline(**components, requires_safety_checker=False), target)


def build_sdxl(target: Path, cache_dir: Path) -> Path:
    """SDXL base's architecture (UNet with its added size and pooled-text conditioning, CLIP
    ViT-L and OpenCLIP ViT-bigG text encoders, SDXL's VAE) with random weights, as build_sd15
    builds SD 1.5's: the tiny SDXL model grown to SDXL base's sizes. Its scheduler is the tiny
    model's, SDXL base's EulerDiscrete configuration."""
    if (target / "model_index.json").is_file():
        return target
    from diffusers import StableDiffusionXLPipeline

    tiny = StableDiffusionXLPipeline.from_pretrained(ensure_tiny_xl_model(cache_dir))
    unet = {
        "block_out_channels": (320, 640, 1280),
        "layers_per_block": 2,
        "down_block_types": ("DownBlock2D",) + ("CrossAttnDownBlock2D",) * 2,
        "up_block_types": ("CrossAttnUpBlock2D",) * 2 + ("UpBlock2D",),
        "transformer_layers_per_block": (1, 2, 10),
        # diffusers' name for SDXL's heads per block (64 channels each).
        "attention_head_dim": (5, 10, 20),
        "use_linear_projection": True,
        # Both text encoders' hidden states side by side: 768 + 1280.
        "cross_attention_dim": 2048,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": 256,
        # The pooled text embedding (1280) and six size and crop numbers of 256 each.
        "projection_class_embeddings_input_dim": 2816,
        "sample_size": 128,
    }
    vae = {"scaling_factor": 0.13025, "force_upcast": True, "sample_size": 1024}
    components = _grown(tiny, unet, vae)
    pipeline = StableDiffusionXLPipeline(**components, add_watermarker=False)
    return _save(pipeline, target)


def bench_model(family: ModelFamilyName, cache_dir: Path, model_dir: Path | None) -> Path:
    """The family's real architecture with random weights, built into `model_dir` once; with no
    `model_dir`, the family's tiny model (a CPU's smoke run)."""
    if model_dir is None:
        return ensure_tiny_model(cache_dir) if family == "sd15" else ensure_tiny_xl_model(cache_dir)
    build = build_sd15 if family == "sd15" else build_sdxl
    return build(model_dir, cache_dir)


def _unet(model_dir: Path) -> torch.nn.Module:
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(model_dir / "unet", torch_dtype=torch.float32)


def _write_loras(model_dir: Path, rank: int, target: Path) -> None:
    """Random adapters on the UNet's attention projections, in the file format PEFT training and
    diffusers' `save_lora_weights` give (the tiny adapters' own), written without PEFT."""
    from diffusers import StableDiffusionPipeline

    target.mkdir(parents=True)
    unet = _unet(model_dir)
    projections = [
        (f"{path}.{part}", layer)
        for path, module in unet.named_modules()
        if type(module).__name__ == "Attention" and ".transformer_blocks." in f".{path}"
        for part, layer in (
            ("to_q", module.to_q),
            ("to_k", module.to_k),
            ("to_v", module.to_v),
            ("to_out.0", module.to_out[0]),
        )
    ]
    for name, seed in _SD15_ADAPTERS.items():
        generator = torch.Generator().manual_seed(seed)
        layers: dict[str, torch.Tensor] = {}
        for path, layer in projections:
            weight = layer.weight.detach()
            down = torch.randn(rank, weight.shape[1], generator=generator)
            up = torch.randn(weight.shape[0], rank, generator=generator)
            up *= LORA_STRENGTH * weight.norm() / (up @ down).norm()
            layers[f"{path}.lora.down.weight"] = down.contiguous()
            layers[f"{path}.lora.up.weight"] = up.contiguous()
        StableDiffusionPipeline.save_lora_weights(
            target, unet_lora_layers=layers, weight_name=f"{name}.safetensors"
        )


def build_sd15_loras(model_dir: Path, cache_dir: Path, rank: int = SD15_LORA_RANK) -> Path:
    """A LoRA registry directory with two random adapters of `rank` for SD 1.5's UNet."""
    target = cache_dir / f"sd15-loras-r{rank}"
    return staged(target, lambda staging: _write_loras(model_dir, rank, staging))


def _write_controlnet(model_dir: Path, target: Path) -> None:
    from diffusers import ControlNetModel

    controlnet = ControlNetModel.from_unet(_unet(model_dir))
    torch.manual_seed(41)
    # from_unet zeroes the convolutions that feed the UNet and the map encoder's last one
    # (training starts from "no effect"); random ones stand in for trained weights, at a scale
    # that keeps each residual about as large as the features it is added to.
    convolutions = [
        *controlnet.controlnet_down_blocks,
        controlnet.controlnet_mid_block,
        controlnet.controlnet_cond_embedding.conv_out,
    ]
    with torch.no_grad():
        for conv in convolutions:
            fan_in = conv.weight[0].numel()
            torch.nn.init.normal_(conv.weight, std=fan_in**-0.5)
    controlnet.to(torch.float16).save_pretrained(target)


def build_sd15_controlnet(model_dir: Path, cache_dir: Path) -> Path:
    """A canny ControlNet of SD 1.5's shapes with random weights, built once from its UNet."""
    target = cache_dir / "sd15-controlnet"
    return staged(target, lambda staging: _write_controlnet(model_dir, staging))


@dataclass(frozen=True)
class Customization:
    """LoRA adapters and ControlNets for a model, as a worker is configured with them."""

    lora_dir: Path
    # Two adapters of the registry, so that alternating them swaps the slots' weights.
    adapters: tuple[str, str]
    # By control type: a directory, or "tiny".
    controlnets: dict[str, str]


def customization(model_dir: Path, cache_dir: Path, tiny: bool) -> Customization:
    """Two LoRA adapters and a canny ControlNet for the tiny model or for SD 1.5's shapes."""
    if tiny:
        from worker.tiny_customization import ensure_tiny_loras

        return Customization(
            ensure_tiny_loras(cache_dir), _TINY_ADAPTERS, {"canny": TINY_CONTROLNET_ID}
        )
    first, second = _SD15_ADAPTERS
    return Customization(
        build_sd15_loras(model_dir, cache_dir),
        (first, second),
        {"canny": str(build_sd15_controlnet(model_dir, cache_dir))},
    )


def load_customized(
    model_dir: Path,
    cache_dir: Path,
    device: str,
    levers: SpeedLevers,
    custom: Customization,
    **options: Any,
) -> DiffusionRenderer:
    """The worker's render core with LoRA slots and ControlNets (and load_renderer's `options`),
    not warmed up yet: warm it up on the thread that will render, after this."""
    renderer = load_renderer(
        str(model_dir), cache_dir, device, levers, controlnets=custom.controlnets, **options
    )
    renderer.use_loras(LoraRegistry(custom.lora_dir), LORA_CACHE_BYTES, LORA_MAX_RANK)
    return renderer


def picture(seed: int, size: int) -> Image:
    """A random picture of coloured blocks: what an image-to-image job starts from."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    return PILImage.fromarray(blocks).resize((size, size), PILImage.Resampling.NEAREST)


def square_mask(size: int) -> Image:
    """White (repaint) in the middle square, black (keep) around it."""
    mask = PILImage.new("L", (size, size))
    mask.paste(255, (size // 4, size // 4, 3 * size // 4, 3 * size // 4))
    return mask


def kind_batch(
    kind: str,
    seeds: Sequence[int],
    size: int,
    steps: int,
    *,
    adapter: str | None = None,
    guidance_scale: float = GUIDANCE,
    scheduler: Scheduler = "dpmpp_2m",
) -> RenderBatch:
    """A batch of one kind of job (one of KINDS), an image per seed, each with the picture, mask
    or edge map its kind brings, drawn from its seed; a "lora" batch names its `adapter`."""
    if kind not in KINDS:
        raise ValueError(f"no job kind {kind!r}; one of {KINDS}")
    if (kind == "lora") != (adapter is not None):
        raise ValueError("a LoRA batch, and only one, names its adapter")

    def item(seed: int) -> RenderItem:
        images: dict[str, Image] = {}
        if kind in ("image-to-image", "inpainting"):
            images["init_image"] = picture(seed, size)
        if kind == "inpainting":
            images["mask_image"] = square_mask(size)
        if kind == "controlnet":
            images["control_image"] = canny_map(picture(seed, size))
        return RenderItem(PROMPT, "blurry", seed, **images)

    return RenderBatch(
        items=tuple(item(seed) for seed in seeds),
        width=size,
        height=size,
        num_inference_steps=steps,
        guidance_scale=guidance_scale,
        scheduler=scheduler,
        strength=IMAGE_STRENGTH if kind in ("image-to-image", "inpainting") else None,
        loras=() if adapter is None else ((adapter, 1.0),),
        control_type="canny" if kind == "controlnet" else None,
    )
