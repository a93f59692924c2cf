"""A tiny, randomly initialised tiny autoencoder (diffusers' `AutoencoderTiny`, TAESD's
architecture) for previews in tests and offline runs: SD 1.5's latent shape, few channels."""

import shutil
import tempfile
from pathlib import Path

TINY_PREVIEW_VAE_ID = "tiny"
# Bump when the architecture below changes, so old caches are not reused.
_TINY_PREVIEW_VERSION = "v1"


def _build(target: Path) -> None:
    import torch
    from diffusers import AutoencoderTiny

    torch.manual_seed(0)
    # TAESD's layout (four stages, 8x up to pixels, its latent clamp and [-1, 1] output) with
    # 8 channels and one block a stage instead of 64 and three: cheap on a CPU.
    vae = AutoencoderTiny(
        encoder_block_out_channels=(8, 8, 8, 8),
        decoder_block_out_channels=(8, 8, 8, 8),
        num_encoder_blocks=(1, 1, 1, 1),
        num_decoder_blocks=(1, 1, 1, 1),
        latent_channels=4,
        # As TAESD for SD 1.5: it reads the diffusion model's latents as they are.
        scaling_factor=1.0,
    )
    vae.save_pretrained(target)


def ensure_tiny_preview_vae(cache_dir: Path) -> Path:
    """Build the tiny preview autoencoder once into `cache_dir`; later calls reuse it."""
    target = cache_dir / f"tiny-taesd-{_TINY_PREVIEW_VERSION}"
    if (target / "config.json").is_file():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=cache_dir, prefix=".building-"))
    try:
        _build(staging / "model")
        try:
            (staging / "model").rename(target)
        except OSError:
            # Another process finished first; its copy is as good as ours.
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
