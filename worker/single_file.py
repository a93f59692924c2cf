"""Writes a pipeline as one `.safetensors` checkpoint in the original Stable Diffusion layout (the
keys fine-tuning tools write and `from_single_file` reads): how the tiny offline model gets a
single-file variant, the inverse of diffusers' own conversion."""

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

_UNET_PREFIX = "model.diffusion_model."
_VAE_PREFIX = "first_stage_model."
_TEXT_ENCODER_PREFIX = "cond_stage_model.transformer."

_UNET_TOP = {
    "time_embedding.linear_1.": "time_embed.0.",
    "time_embedding.linear_2.": "time_embed.2.",
    "conv_in.": "input_blocks.0.0.",
    "conv_norm_out.": "out.0.",
    "conv_out.": "out.2.",
}
_UNET_RESNET = {
    "norm1.": "in_layers.0.",
    "conv1.": "in_layers.2.",
    "norm2.": "out_layers.0.",
    "conv2.": "out_layers.3.",
    "time_emb_proj.": "emb_layers.1.",
    "conv_shortcut.": "skip_connection.",
}
_VAE_RENAMES = {"conv_shortcut.": "nin_shortcut.", "conv_norm_out.": "norm_out."}
_VAE_ATTENTION = {
    "group_norm.": "norm.",
    "to_q.": "q.",
    "to_k.": "k.",
    "to_v.": "v.",
    "to_out.0.": "proj_out.",
}


def _unet_prefixes(config: Any) -> dict[str, str]:
    """diffusers prefix -> original prefix, for any number of blocks and layers per block."""
    per_block = config.layers_per_block
    blocks = len(config.block_out_channels)
    prefixes = dict(_UNET_TOP)
    for i, kind in enumerate(config.down_block_types):
        for j in range(per_block):
            sd = f"input_blocks.{(per_block + 1) * i + j + 1}."
            prefixes[f"down_blocks.{i}.resnets.{j}."] = sd + "0."
            if kind.startswith("CrossAttn"):
                prefixes[f"down_blocks.{i}.attentions.{j}."] = sd + "1."
        if i < blocks - 1:
            sd = f"input_blocks.{(per_block + 1) * (i + 1)}.0.op."
            prefixes[f"down_blocks.{i}.downsamplers.0.conv."] = sd
    for i, kind in enumerate(config.up_block_types):
        attention = kind.startswith("CrossAttn")
        for j in range(per_block + 1):
            sd = f"output_blocks.{(per_block + 1) * i + j}."
            prefixes[f"up_blocks.{i}.resnets.{j}."] = sd + "0."
            if attention:
                prefixes[f"up_blocks.{i}.attentions.{j}."] = sd + "1."
        if i < blocks - 1:
            sd = f"output_blocks.{(per_block + 1) * i + per_block}.{2 if attention else 1}."
            prefixes[f"up_blocks.{i}.upsamplers.0."] = sd
    prefixes["mid_block.attentions.0."] = "middle_block.1."
    for j in range(2):
        prefixes[f"mid_block.resnets.{j}."] = f"middle_block.{2 * j}."
    return prefixes


def _rename(key: str, prefixes: dict[str, str], inner: dict[str, str]) -> str:
    for hf_prefix, sd_prefix in prefixes.items():
        if key.startswith(hf_prefix):
            rest = key[len(hf_prefix) :]
            for hf_part, sd_part in inner.items():
                if rest.startswith(hf_part):
                    rest = sd_part + rest[len(hf_part) :]
                    break
            return sd_prefix + rest
    return key


def _unet_state(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    prefixes = _unet_prefixes(unet.config)
    return {
        _UNET_PREFIX + _rename(key, prefixes, _UNET_RESNET): value
        for key, value in unet.state_dict().items()
    }


def _vae_prefixes(config: Any) -> dict[str, str]:
    per_block = config.layers_per_block
    blocks = len(config.block_out_channels)
    prefixes: dict[str, str] = {}
    for i in range(blocks):
        for j in range(per_block):
            prefixes[f"encoder.down_blocks.{i}.resnets.{j}."] = f"encoder.down.{i}.block.{j}."
        for j in range(per_block + 1):
            sd = f"decoder.up.{blocks - 1 - i}.block.{j}."
            prefixes[f"decoder.up_blocks.{i}.resnets.{j}."] = sd
        if i < blocks - 1:
            prefixes[f"encoder.down_blocks.{i}.downsamplers.0."] = f"encoder.down.{i}.downsample."
            upsample = f"decoder.up.{blocks - 1 - i}.upsample."
            prefixes[f"decoder.up_blocks.{i}.upsamplers.0."] = upsample
    for part in ("encoder", "decoder"):
        for j in range(2):
            prefixes[f"{part}.mid_block.resnets.{j}."] = f"{part}.mid.block_{j + 1}."
        prefixes[f"{part}.mid_block.attentions.0."] = f"{part}.mid.attn_1."
        prefixes[f"{part}.conv_norm_out."] = f"{part}.norm_out."
    return prefixes


def _vae_state(vae: torch.nn.Module) -> dict[str, torch.Tensor]:
    prefixes = _vae_prefixes(vae.config)
    state = {}
    for key, value in vae.state_dict().items():
        renamed = _rename(key, prefixes, {**_VAE_RENAMES, **_VAE_ATTENTION})
        if ".mid.attn_1." in renamed and value.ndim == 2:
            # The original attention projections are 1x1 convolutions.
            value = value.reshape(*value.shape, 1, 1)
        state[_VAE_PREFIX + renamed] = value
    return state


def _text_encoder_state(text_encoder: torch.nn.Module) -> dict[str, torch.Tensor]:
    # Newer transformers flatten CLIPTextModel; checkpoints keep its `text_model.` level.
    state = {}
    for key, value in text_encoder.state_dict().items():
        nested = key if key.startswith("text_model.") else "text_model." + key
        state[_TEXT_ENCODER_PREFIX + nested] = value
    return state


def save_single_file(pipeline: Any, target: Path) -> None:
    """The pipeline's UNet, VAE and text encoder as one original-layout checkpoint."""
    state = {
        **_unet_state(pipeline.unet),
        **_vae_state(pipeline.vae),
        **_text_encoder_state(pipeline.text_encoder),
    }
    save_file({key: value.contiguous() for key, value in state.items()}, str(target))
