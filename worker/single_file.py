"""Writes a pipeline as one `.safetensors` checkpoint in the original Stable Diffusion (SD 1.5) or
SDXL layout (the keys fine-tuning tools write and `from_single_file` reads): how the tiny offline
models get a single-file variant, the inverse of diffusers' own conversion."""

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

_UNET_PREFIX = "model.diffusion_model."
_VAE_PREFIX = "first_stage_model."
_TEXT_ENCODER_PREFIX = "cond_stage_model.transformer."
# SDXL's two text encoders: OpenAI's CLIP as transformers names it, then OpenCLIP's bigG.
_XL_TEXT_ENCODER_PREFIX = "conditioner.embedders.0.transformer."
_XL_OPEN_CLIP_PREFIX = "conditioner.embedders.1.model."

_UNET_TOP = {
    "time_embedding.linear_1.": "time_embed.0.",
    "time_embedding.linear_2.": "time_embed.2.",
    "conv_in.": "input_blocks.0.0.",
    "conv_norm_out.": "out.0.",
    "conv_out.": "out.2.",
    # SDXL's embedding of the pooled text and the size/crop numbers.
    "add_embedding.linear_1.": "label_emb.0.0.",
    "add_embedding.linear_2.": "label_emb.0.2.",
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
_OPEN_CLIP_TOP = {
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.final_layer_norm.weight": "ln_final.weight",
    "text_model.final_layer_norm.bias": "ln_final.bias",
}
_OPEN_CLIP_LAYER = {
    "layer_norm1.": "ln_1.",
    "layer_norm2.": "ln_2.",
    "self_attn.out_proj.": "attn.out_proj.",
    "mlp.fc1.": "mlp.c_fc.",
    "mlp.fc2.": "mlp.c_proj.",
}
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


def _rename_start(key: str, renames: dict[str, str]) -> str:
    for hf_part, sd_part in renames.items():
        if key.startswith(hf_part):
            return sd_part + key[len(hf_part) :]
    return key


def _rename(key: str, prefixes: dict[str, str], inner: dict[str, str]) -> str:
    for hf_prefix, sd_prefix in prefixes.items():
        if key.startswith(hf_prefix):
            return sd_prefix + _rename_start(key[len(hf_prefix) :], inner)
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


def _text_encoder_state(
    text_encoder: torch.nn.Module, prefix: str = _TEXT_ENCODER_PREFIX
) -> dict[str, torch.Tensor]:
    # Newer transformers flatten CLIPTextModel; checkpoints keep its `text_model.` level.
    state = {}
    for key, value in text_encoder.state_dict().items():
        nested = key if key.startswith("text_model.") else "text_model." + key
        state[prefix + nested] = value
    return state


def _open_clip_state(text_encoder: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A CLIPTextModelWithProjection in OpenCLIP's layout: each layer's query, key and value
    projections are one `in_proj`, and the text projection is a matrix applied from the right."""
    source = text_encoder.state_dict()
    state = {"text_projection": source["text_projection.weight"].T}
    for hf_key, open_clip_key in _OPEN_CLIP_TOP.items():
        state[open_clip_key] = source[hf_key]
    layers = "text_model.encoder.layers."
    for key, value in source.items():
        if not key.startswith(layers):
            continue
        index, rest = key[len(layers) :].split(".", 1)
        block = f"transformer.resblocks.{index}."
        if rest.startswith("self_attn.q_proj."):
            kind = rest.rsplit(".", 1)[1]
            attention = f"{layers}{index}.self_attn."
            state[f"{block}attn.in_proj_{kind}"] = torch.cat(
                [source[f"{attention}{projection}_proj.{kind}"] for projection in "qkv"]
            )
        elif not rest.startswith(("self_attn.k_proj.", "self_attn.v_proj.")):
            state[block + _rename_start(rest, _OPEN_CLIP_LAYER)] = value
    return {_XL_OPEN_CLIP_PREFIX + key: value for key, value in state.items()}


def save_single_file(pipeline: Any, target: Path) -> None:
    """The pipeline's UNet, VAE and text encoder(s) as one original-layout checkpoint: SD 1.5's,
    or SDXL's where the pipeline has a second text encoder."""
    state = {**_unet_state(pipeline.unet), **_vae_state(pipeline.vae)}
    if getattr(pipeline, "text_encoder_2", None) is None:
        state.update(_text_encoder_state(pipeline.text_encoder))
    else:
        state.update(_text_encoder_state(pipeline.text_encoder, _XL_TEXT_ENCODER_PREFIX))
        state.update(_open_clip_state(pipeline.text_encoder_2))
    save_file({key: value.contiguous() for key, value in state.items()}, str(target))
