"""What the GPU benchmark and the GPU tests render with, built offline once in a cache directory:
SD 1.5's and SDXL base's architectures with random weights, LoRA adapters and a canny ControlNet
of either's shapes (or the tiny models' own, when smoke-testing on a CPU), and each kind of job
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
from worker.controlnet import TINY_CONTROLNET_ID, TINY_XL_CONTROLNET_ID, canny_map
from worker.kinds import load_renderer
from worker.pipeline import DiffusionRenderer, RenderBatch, RenderItem, SpeedLevers
from worker.tiny_customization import TINY_LORAS, TINY_XL_LORAS, staged
from worker.tiny_model import ensure_tiny_model, ensure_tiny_xl_model

# Models, adapters and the compile cache; the GPU tests reuse them when the benchmark ran first.
DEFAULT_CACHE_DIR = Path(tempfile.gettempdir()) / "t2i-bench-cache"
PROMPT = "a lighthouse at dusk, oil painting, highly detailed"
GUIDANCE = 7.5
# The rank of the random adapters of either family: what style adapters are commonly trained with.
LORA_RANK = 32
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
# The random adapters of each family's real architecture, by name, with the seed each is drawn from.
_ADAPTERS: dict[ModelFamilyName, dict[str, int]] = {
    "sd15": {"random-style": 31, "random-other": 32},
    "sdxl": {"random-xl-style": 33, "random-xl-other": 34},
}
_TINY_ADAPTERS: dict[ModelFamilyName, tuple[str, ...]] = {
    "sd15": tuple(TINY_LORAS),
    "sdxl": tuple(TINY_XL_LORAS),
}
# The attention projections of the UNet's transformer blocks, which every family's adapters adapt.
_UNET_ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")
_TEXT_ATTENTION = ("q_proj", "k_proj", "v_proj", "out_proj")


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


def _unet_layers(model_dir: Path, feed_forward: bool) -> list[tuple[str, torch.nn.Module]]:
    """The UNet's layers an adapter adapts, by name: the attention projections of its transformer
    blocks, and with `feed_forward` their feed-forward layers too."""
    unet = _unet(model_dir)
    layers: list[tuple[str, torch.nn.Module]] = []
    for path, module in unet.named_modules():
        kind = type(module).__name__
        if kind == "Attention" and ".transformer_blocks." in f".{path}":
            layers += [(f"{path}.{part}", module.get_submodule(part)) for part in _UNET_ATTENTION]
        elif kind == "FeedForward" and feed_forward:
            layers += [(f"{path}.net.0.proj", module.net[0].proj), (f"{path}.net.2", module.net[2])]
    return layers


def _text_encoder_layers(model_dir: Path, name: str) -> list[tuple[str, torch.nn.Module]]:
    """The attention projections of a text encoder (`name`, its folder), by the names adapters in
    the wild give them."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    model = CLIPTextModelWithProjection if name == "text_encoder_2" else CLIPTextModel
    encoder = model.from_pretrained(model_dir / name)
    # Adapters name a text encoder's layers under `text_model.`, which transformers 5's CLIP text
    # models no longer have (as worker/tiny_customization.py writes them).
    prefix = "" if hasattr(encoder, "text_model") else "text_model."
    return [
        (f"{prefix}{path}.{part}", getattr(module, part))
        for path, module in encoder.named_modules()
        if type(module).__name__.endswith("Attention")
        for part in _TEXT_ATTENTION
    ]


def _random_layers(
    layers: list[tuple[str, torch.nn.Module]], rank: int, form: str, generator: torch.Generator
) -> dict[str, torch.Tensor]:
    """A random adapter of `rank` on `layers`, its product BA LORA_STRENGTH of each layer's own
    weights, keyed as `<layer>.<form>.down.weight` and `<layer>.<form>.up.weight`."""
    drawn: dict[str, torch.Tensor] = {}
    for path, layer in layers:
        weight = layer.weight.detach().float()
        down = torch.randn(rank, weight.shape[1], generator=generator)
        up = torch.randn(weight.shape[0], rank, generator=generator)
        up *= LORA_STRENGTH * weight.norm() / (up @ down).norm()
        drawn[f"{path}.{form}.down.weight"] = down.contiguous()
        drawn[f"{path}.{form}.up.weight"] = up.contiguous()
    return drawn


def _write_loras(family: ModelFamilyName, model_dir: Path, rank: int, target: Path) -> None:
    """Random adapters for the family's architecture, in the file format diffusers'
    `save_lora_weights` gives (the tiny adapters' own), written without PEFT. SD 1.5's adapt the
    UNet's attention projections; SDXL's also its feed-forward layers and both text encoders'
    attention projections, as diffusers' SDXL training script targets them."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    target.mkdir(parents=True)
    xl = family == "sdxl"
    components = {"unet": _unet_layers(model_dir, feed_forward=xl)}
    if xl:
        for name in ("text_encoder", "text_encoder_2"):
            components[name] = _text_encoder_layers(model_dir, name)
    pipeline = StableDiffusionXLPipeline if xl else StableDiffusionPipeline
    for name, seed in _ADAPTERS[family].items():
        generator = torch.Generator().manual_seed(seed)
        # diffusers' own form for the UNet's layers; its text-encoder form for the encoders'.
        layers = {
            f"{component}_lora_layers": _random_layers(
                component_layers,
                rank,
                "lora" if component == "unet" else "lora_linear_layer",
                generator,
            )
            for component, component_layers in components.items()
        }
        pipeline.save_lora_weights(target, **layers, weight_name=f"{name}.safetensors")


def build_loras(
    family: ModelFamilyName, model_dir: Path, cache_dir: Path, rank: int = LORA_RANK
) -> Path:
    """A LoRA registry directory with two random adapters of `rank` for the family's
    architecture (built by build_sd15 or build_sdxl into `model_dir`)."""
    target = cache_dir / f"{family}-loras-r{rank}"
    return staged(target, lambda staging: _write_loras(family, model_dir, rank, staging))


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


def build_controlnet(family: ModelFamilyName, model_dir: Path, cache_dir: Path) -> Path:
    """A canny ControlNet of the family's shapes with random weights, built once from the UNet
    in `model_dir`."""
    target = cache_dir / f"{family}-controlnet"
    return staged(target, lambda staging: _write_controlnet(model_dir, staging))


@dataclass(frozen=True)
class Customization:
    """LoRA adapters and ControlNets for a model, as a worker is configured with them."""

    lora_dir: Path
    # Two adapters of the registry, so that alternating them swaps the slots' weights.
    adapters: tuple[str, str]
    # By control type: a directory, or "tiny".
    controlnets: dict[str, str]


def customization(
    model_dir: Path, cache_dir: Path, tiny: bool, family: ModelFamilyName = "sd15"
) -> Customization:
    """Two LoRA adapters and a canny ControlNet for the family's tiny model or for its real
    architecture's shapes (in `model_dir`)."""
    if tiny:
        from worker.tiny_customization import ensure_tiny_loras, ensure_tiny_xl_loras

        first, second = _TINY_ADAPTERS[family]
        if family == "sd15":
            return Customization(
                ensure_tiny_loras(cache_dir), (first, second), {"canny": TINY_CONTROLNET_ID}
            )
        return Customization(
            ensure_tiny_xl_loras(cache_dir), (first, second), {"canny": TINY_XL_CONTROLNET_ID}
        )
    first, second = _ADAPTERS[family]
    return Customization(
        build_loras(family, model_dir, cache_dir),
        (first, second),
        {"canny": str(build_controlnet(family, model_dir, cache_dir))},
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
