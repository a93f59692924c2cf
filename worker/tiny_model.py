"""A tiny, randomly initialised SD-1.5-shaped pipeline for tests and offline runs."""

import json
import shutil
import tempfile
from pathlib import Path

TINY_MODEL_ID = "tiny"
# Bump when the architecture below changes, so old caches are not reused.
_TINY_VERSION = "v1"


def _byte_to_unicode() -> dict[int, str]:
    """The byte-level alphabet of CLIP's BPE: every byte gets a printable character."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    mapping = {byte: chr(byte) for byte in printable}
    unprintable = [byte for byte in range(256) if byte not in mapping]
    for offset, byte in enumerate(unprintable):
        mapping[byte] = chr(256 + offset)
    return mapping


def _write_tokenizer_files(directory: Path) -> None:
    """A CLIP tokenizer with no merges: every character is one token."""
    characters = list(_byte_to_unicode().values())
    tokens = characters + [c + "</w>" for c in characters] + ["<|startoftext|>", "<|endoftext|>"]
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (directory / "merges.txt").write_text("#version: 0.2\n")


def _build(target: Path) -> None:
    import torch
    from diffusers import (
        AutoencoderKL,
        DPMSolverMultistepScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=64,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=4,
        norm_num_groups=8,
    )
    # Four blocks, three downsamples: the VAE scale factor is 8, as in SD 1.5.
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16),
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=4,
        sample_size=512,
    )
    with tempfile.TemporaryDirectory() as tokenizer_dir:
        _write_tokenizer_files(Path(tokenizer_dir))
        tokenizer = CLIPTokenizer(
            str(Path(tokenizer_dir) / "vocab.json"),
            str(Path(tokenizer_dir) / "merges.txt"),
            model_max_length=77,
        )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_attention_heads=4,
            num_hidden_layers=2,
            max_position_embeddings=77,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    scheduler = DPMSolverMultistepScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        steps_offset=1,
        algorithm_type="dpmsolver++",
        solver_order=2,
    )
    pipeline = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.save_pretrained(target)


def ensure_tiny_model(cache_dir: Path) -> Path:
    """Build the tiny pipeline once into `cache_dir`; later calls reuse it."""
    target = cache_dir / f"tiny-sd15-{_TINY_VERSION}"
    if (target / "model_index.json").is_file():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=cache_dir, prefix=".building-"))
    try:
        _build(staging)
        try:
            staging.rename(target)
        except OSError:
            # Another process finished first; its copy is as good as ours.
            if not (target / "model_index.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
