"""Tiny LoRA adapters and tiny ControlNets for the tiny models (SD 1.5 and SDXL shaped), made with
the tooling users use:
PEFT and diffusers' `save_lora_weights` (safetensors) for the adapters, `ControlNetModel.from_unet`
for the ControlNet."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from worker.tiny_model import ensure_tiny_model, ensure_tiny_xl_model

# The tiny adapters, by name, with the seed each is drawn from.
TINY_LORAS = {"tiny-style": 11, "tiny-other": 12}
# The tiny SDXL model's adapters.
TINY_XL_LORAS = {"tiny-xl-style": 13, "tiny-xl-other": 14}
_VERSION = "v2"
# Bump with the tiny SDXL model's version: its adapters and ControlNet are drawn from its shape.
_XL_VERSION = "v2"
# The layers LoRA training adapts, as diffusers' SDXL training script targets them.
_UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"]
_TEXT_ENCODER_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
# How far a tiny adapter's product BA reaches: a fraction of its layer's own weights, so that an
# adapter visibly changes an image without swamping it.
_LORA_STRENGTH = 0.5


def staged(target: Path, build: Callable[[Path], None]) -> Path:
    """Build into a staging folder beside `target` and move it in place; reuse a finished one."""
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".building-"))
    try:
        build(staging / "out")
        try:
            (staging / "out").rename(target)
        except OSError:
            # Another process finished first; its copy is as good as ours.
            if not target.is_dir():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _random_lora(model: Any, target_modules: list[str]) -> dict[str, Any]:
    """What LoRA training adds to `model` (a UNet or text encoder), drawn at random in place of
    trained weights, as the layers `save_lora_weights` takes."""
    import torch
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict
    from transformers import PreTrainedModel

    config = LoraConfig(r=4, lora_alpha=4, target_modules=target_modules, init_lora_weights=False)
    text_encoder = isinstance(model, PreTrainedModel)
    if text_encoder:
        # transformers' own add_adapter asks for a newer PEFT than the service pins.
        inject_adapter_in_model(config, model)
    else:
        model.add_adapter(config)
    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "lora_B") and "default" in module.lora_B:
                down, up = module.lora_A["default"].weight, module.lora_B["default"].weight
                product = (up @ down).norm()
                base_weight = module.base_layer.weight.norm()
                up.mul_(_LORA_STRENGTH * base_weight / product)
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(model))
    if text_encoder and not hasattr(model, "text_model"):
        # Adapters in the wild name a text encoder's layers under `text_model.`, which
        # transformers 5's CLIP text models no longer have; both loaders take that form.
        layers = {f"text_model.{name}": layer for name, layer in layers.items()}
    return layers


def _build_loras(cache_dir: Path, target: Path) -> None:
    import torch
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    target.mkdir(parents=True)
    base = ensure_tiny_model(cache_dir)
    for name, seed in TINY_LORAS.items():
        unet = UNet2DConditionModel.from_pretrained(base / "unet")
        torch.manual_seed(seed)
        layers = _random_lora(unet, ["to_q", "to_k", "to_v", "to_out.0"])
        StableDiffusionPipeline.save_lora_weights(
            target, unet_lora_layers=layers, weight_name=f"{name}.safetensors"
        )


def _build_xl_loras(cache_dir: Path, target: Path) -> None:
    import torch
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    target.mkdir(parents=True)
    base = ensure_tiny_xl_model(cache_dir)
    for name, seed in TINY_XL_LORAS.items():
        unet = UNet2DConditionModel.from_pretrained(base / "unet")
        text_encoder = CLIPTextModel.from_pretrained(base / "text_encoder")
        text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(base / "text_encoder_2")
        torch.manual_seed(seed)
        StableDiffusionXLPipeline.save_lora_weights(
            target,
            unet_lora_layers=_random_lora(unet, _UNET_TARGETS),
            text_encoder_lora_layers=_random_lora(text_encoder, _TEXT_ENCODER_TARGETS),
            text_encoder_2_lora_layers=_random_lora(text_encoder_2, _TEXT_ENCODER_TARGETS),
            weight_name=f"{name}.safetensors",
        )


def ensure_tiny_loras(cache_dir: Path) -> Path:
    """A LoRA registry directory holding the tiny adapters (TINY_LORAS), built once."""
    target = cache_dir / f"tiny-loras-{_VERSION}"
    return staged(target, lambda staging: _build_loras(cache_dir, staging))


def ensure_tiny_xl_loras(cache_dir: Path) -> Path:
    """A LoRA registry directory holding the tiny SDXL model's adapters (TINY_XL_LORAS), each
    with UNet and both text encoders' layers, built once."""
    target = cache_dir / f"tiny-xl-loras-{_XL_VERSION}"
    return staged(target, lambda staging: _build_xl_loras(cache_dir, staging))


def ensure_tiny_loras_of_both_families(cache_dir: Path) -> Path:
    """One LoRA registry directory holding the tiny SD 1.5 and the tiny SDXL adapters, as a
    deployment serving both families has one registry."""

    def build(staging: Path) -> None:
        staging.mkdir()
        for registry in (ensure_tiny_loras(cache_dir), ensure_tiny_xl_loras(cache_dir)):
            for adapter in registry.glob("*.safetensors"):
                shutil.copy(adapter, staging / adapter.name)

    return staged(cache_dir / f"tiny-loras-both-{_VERSION}-{_XL_VERSION}", build)


def _build_controlnet(base: Path, target: Path, seed: int) -> None:
    import torch
    from diffusers import ControlNetModel, UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(base / "unet")
    controlnet = ControlNetModel.from_unet(
        unet, conditioning_embedding_out_channels=(8, 16, 16, 32)
    )
    torch.manual_seed(seed)
    # from_unet zeroes the convolutions that feed the UNet (training starts from "no effect");
    # random ones stand in for trained weights, so control visibly changes an image. The map's
    # own encoder is redrawn wider than its default, which leaves a sparse edge map with almost
    # no say: its features then reach about the size of the UNet's.
    with torch.no_grad():
        for conv in [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block]:
            torch.nn.init.normal_(conv.weight, std=0.05)
        for module in controlnet.controlnet_cond_embedding.modules():
            if isinstance(module, torch.nn.Conv2d):
                torch.nn.init.normal_(module.weight, std=0.2)
                torch.nn.init.zeros_(module.bias)
    controlnet.save_pretrained(target)


def ensure_tiny_controlnet(cache_dir: Path) -> Path:
    """A tiny ControlNet for the tiny model, built once from its UNet."""
    target = cache_dir / f"tiny-controlnet-{_VERSION}"
    return staged(
        target, lambda staging: _build_controlnet(ensure_tiny_model(cache_dir), staging, 21)
    )


def ensure_tiny_xl_controlnet(cache_dir: Path) -> Path:
    """A tiny ControlNet for the tiny SDXL model, built once from its UNet."""
    target = cache_dir / f"tiny-xl-controlnet-{_XL_VERSION}"
    return staged(
        target, lambda staging: _build_controlnet(ensure_tiny_xl_model(cache_dir), staging, 22)
    )


if __name__ == "__main__":
    # `make run` with the tiny model: build the tiny adapters, print their registry directory;
    # with the argument `tiny-xl` (a tiny SDXL worker beside), the registry of both families.
    import sys

    from shared.settings import worker_settings
    from worker.library_logs import route_library_logs

    # Its progress bars would land between the service's log lines (JSON ones too).
    route_library_logs()
    cache = worker_settings().model_cache_dir
    both = "tiny-xl" in sys.argv[1:]
    print(ensure_tiny_loras_of_both_families(cache) if both else ensure_tiny_loras(cache))
