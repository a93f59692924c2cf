"""Tiny, randomly initialised SD-1.5- and SDXL-shaped pipelines for tests and offline runs."""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig

TINY_MODEL_ID = "tiny"
# The second tiny model, for tests that serve two models side by side.
SECOND_TINY_MODEL_ID = "tiny-second"
# The tiny SDXL-shaped model.
TINY_XL_MODEL_ID = "tiny-xl"
# Bump when the architecture below changes, so old caches are not reused.
_TINY_VERSION = "v2"
_TINY_XL_VERSION = "v2"


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


# The one request the tiny safety checker is built to flag (its first concept is that image's
# own embedding); tests send exactly this to see a flagged image.
FLAGGED_REQUEST = {
    "prompt": "the tiny safety checker flags this image",
    "seed": 4242,
    "width": 256,
    "height": 256,
    "num_inference_steps": 2,
    "guidance_scale": 7.5,
    "scheduler": "dpmpp_2m",
}
# FLAGGED_REQUEST for the tiny SDXL model: the SDXL family's smallest size.
FLAGGED_XL_REQUEST = {**FLAGGED_REQUEST, "width": 512, "height": 512}
# Seeds whose images, rendered like the flagged one, set the checker's threshold below it.
_UNFLAGGED_SEEDS = range(6)
# The cosine similarity to the flagged image's embedding above which an image is flagged.
_FLAG_THRESHOLD = 0.97
# Large constant channels that carry the VAE's group norms through unchanged (see _passthrough_vae).
_CARRIER = 100.0


def _passthrough_vae() -> AutoencoderKL:
    """A VAE built by hand, not trained: its latents are the image's three colour channels
    averaged over 8x8 blocks, and it decodes them back as 8x8 blocks. Image-to-image results
    can then be measured against their input; a random VAE would scramble every image.

    Each residual branch is zeroed (its block passes the input on), downsampling averages, and
    upsampling repeats. The group norms that are not in a residual branch see each colour as a
    group of (x, -x, K, -K): its mean is 0 and its spread about K, whatever the image, so the
    norm is a fixed scale; SiLU(u) - SiLU(-u) = u then undoes the activation exactly."""
    import torch
    from diffusers import AutoencoderKL

    channels = (12, 12, 24, 24)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=channels,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=3,
        sample_size=512,
        scaling_factor=1.0,
    )
    with torch.no_grad():
        for parameter in vae.parameters():
            parameter.zero_()
        for module in vae.modules():
            if isinstance(module, torch.nn.GroupNorm):
                module.weight.fill_(1.0)

        def carry(conv: torch.nn.Conv2d, sources: list[int], width: int, sign: float = 1) -> None:
            """Colour g of `sources` into channels g*width + (x, -x) with carriers (K, -K)."""
            centre = conv.kernel_size[0] // 2
            for colour, source in enumerate(sources):
                base = colour * width
                conv.weight[base, source, centre, centre] = sign
                conv.weight[base + 1, source, centre, centre] = -sign
                conv.bias[base + 2], conv.bias[base + 3] = _CARRIER, -_CARRIER

        def shortcut(conv: torch.nn.Conv2d, source_width: int, target_width: int) -> None:
            for colour in range(3):
                for offset in range(4):
                    conv.weight[colour * target_width + offset, colour * source_width + offset] = 1

        def identity(conv: torch.nn.Conv2d) -> None:
            centre = conv.kernel_size[0] // 2
            for channel in range(conv.out_channels):
                conv.weight[channel, channel, centre, centre] = 1

        def read_out(conv: torch.nn.Conv2d, width: int) -> None:
            """Colour g back from its (x, -x) channels after a group norm and SiLU."""
            # The group's spread: x and the carriers dominate, x^2 << K^2.
            spread = _CARRIER * (2 / width) ** 0.5
            centre = conv.kernel_size[0] // 2
            for colour in range(3):
                conv.weight[colour, colour * width, centre, centre] = spread
                conv.weight[colour, colour * width + 1, centre, centre] = -spread

        encoder, decoder = vae.encoder, vae.decoder
        carry(encoder.conv_in, [0, 1, 2], channels[0] // 3)
        for index, block in enumerate(encoder.down_blocks):
            resnet = block.resnets[0]
            if resnet.conv_shortcut is not None:
                shortcut(resnet.conv_shortcut, channels[index - 1] // 3, channels[index] // 3)
            for downsampler in block.downsamplers or []:
                for channel in range(downsampler.conv.out_channels):
                    downsampler.conv.weight[channel, channel, 0:2, 0:2] = 0.25
        read_out(encoder.conv_out, channels[-1] // 3)
        # Log-variance far below zero: a latent sample is its mean.
        encoder.conv_out.bias[4:] = -30.0
        identity(vae.quant_conv)
        identity(vae.post_quant_conv)
        reversed_channels = channels[::-1]
        carry(decoder.conv_in, [0, 1, 2], reversed_channels[0] // 3)
        for index, block in enumerate(decoder.up_blocks):
            resnet = block.resnets[0]
            if resnet.conv_shortcut is not None:
                previous = reversed_channels[index - 1] // 3
                shortcut(resnet.conv_shortcut, previous, reversed_channels[index] // 3)
            for upsampler in block.upsamplers or []:
                identity(upsampler.conv)
        read_out(decoder.conv_out, channels[0] // 3)
    return vae


def render_request(pipeline: Any, request: dict[str, Any], seed: int, **extra: Any) -> Any:
    """`request` (a job's prompt, size, steps and guidance) with `seed`, rendered by diffusers'
    own `pipeline` with its scheduler as it is and no negative prompt; `extra` goes to the
    pipeline's call."""
    import torch

    return pipeline(
        request["prompt"],
        negative_prompt=None,
        width=request["width"],
        height=request["height"],
        num_inference_steps=request["num_inference_steps"],
        guidance_scale=request["guidance_scale"],
        generator=torch.Generator("cpu").manual_seed(seed),
        **extra,
    ).images[0]


def _tiny_safety_checker(pipeline: Any, request: dict[str, Any]) -> tuple[Any, Any]:
    """SD 1.5's safety checker, shrunk, whose first concept is the embedding of the image the
    pipeline renders for `request`; its threshold lies halfway between that image and the
    nearest of a few others, so only images very like it are flagged."""
    import torch
    from diffusers import DPMSolverMultistepScheduler
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    assert request["scheduler"] == "dpmpp_2m"
    config = CLIPConfig(
        text_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1},
        vision_config={
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "image_size": 32,
            "patch_size": 8,
        },
        projection_dim=64,
    )
    checker = StableDiffusionSafetyChecker(config).eval()
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size=32)
    # The service's "dpmpp_2m" (worker/pipeline.py), made from the pipeline's own scheduler
    # as the service makes it; the saved pipeline keeps its own.
    saved_scheduler = pipeline.scheduler
    render_scheduler = DPMSolverMultistepScheduler.from_config(
        saved_scheduler.config, algorithm_type="dpmsolver++", solver_order=2
    )

    def embedding(seed: int) -> torch.Tensor:
        image = render_request(pipeline, request, seed)
        pixels = processor(images=image, return_tensors="pt").pixel_values
        return checker.visual_projection(checker.vision_model(pixels)[1])[0]

    pipeline.scheduler = render_scheduler
    try:
        with torch.no_grad():
            flagged = embedding(int(request["seed"]))
            others = torch.stack([embedding(seed) for seed in _UNFLAGGED_SEEDS])
    finally:
        pipeline.scheduler = saved_scheduler
    with torch.no_grad():
        # A random vision model maps every image near one direction: project it out, so that
        # embeddings tell images apart.
        common = torch.nn.functional.normalize(others.mean(dim=0), dim=0)
        projection = torch.eye(len(common)) - torch.outer(common, common)
        checker.visual_projection.weight.copy_(projection @ checker.visual_projection.weight)
        flagged = torch.nn.functional.normalize(projection @ flagged, dim=0)
        others = torch.nn.functional.normalize(others @ projection.T, dim=1)
        nearest = float((others @ flagged).max())
        # Every other concept points away from the flagged image and matches nothing like it.
        checker.concept_embeds.copy_(-flagged.expand_as(checker.concept_embeds))
        checker.special_care_embeds.copy_(-flagged.expand_as(checker.special_care_embeds))
        checker.concept_embeds[0] = flagged
        checker.concept_embeds_weights.fill_(1.0)
        checker.special_care_embeds_weights.fill_(1.0)
        checker.concept_embeds_weights[0] = max(_FLAG_THRESHOLD, (1.0 + nearest) / 2)
    return checker, processor


def _text_encoder_config(tokenizer: Any, **extra: Any) -> CLIPTextConfig:
    from transformers import CLIPTextConfig

    settings: dict[str, Any] = {
        "vocab_size": len(tokenizer),
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
        "max_position_embeddings": 77,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    return CLIPTextConfig(**{**settings, **extra})


# What both tiny UNets share: two levels, one layer each, the first without attention.
_TINY_UNET: dict[str, Any] = {
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": (32, 64),
    "layers_per_block": 1,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
    "norm_num_groups": 8,
}


def _build(target: Path, seed: int) -> None:
    import torch
    from diffusers import (
        DPMSolverMultistepScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        **_TINY_UNET, sample_size=64, cross_attention_dim=32, attention_head_dim=4
    )
    with tempfile.TemporaryDirectory() as tokenizer_dir:
        _write_tokenizer_files(Path(tokenizer_dir))
        tokenizer = CLIPTokenizer(
            str(Path(tokenizer_dir) / "vocab.json"),
            str(Path(tokenizer_dir) / "merges.txt"),
            model_max_length=77,
        )
    text_encoder = CLIPTextModel(_text_encoder_config(tokenizer))
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
        vae=_passthrough_vae(),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.set_progress_bar_config(disable=True)
    checker, processor = _tiny_safety_checker(pipeline, FLAGGED_REQUEST)
    pipeline.register_modules(safety_checker=checker, feature_extractor=processor)
    pipeline.save_pretrained(target)
    from worker.single_file import save_single_file

    save_single_file(pipeline, target.with_suffix(".safetensors"))


def _build_xl(target: Path, seed: int) -> None:
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    torch.manual_seed(seed)
    # The encoders differ in width, as SDXL's do (768 and 1280): diffusers' single-file loader
    # tells a checkpoint's two encoders apart by it.
    text_hidden, text_hidden_2, projection_dim, time_embed_dim = 32, 48, 32, 8
    unet = UNet2DConditionModel(
        **_TINY_UNET,
        sample_size=128,
        # SDXL stacks several transformer blocks in an attention; real SDXL (1, 2, 10).
        transformer_layers_per_block=(1, 2),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        # Both text encoders' hidden states, concatenated.
        cross_attention_dim=text_hidden + text_hidden_2,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_embed_dim,
        # The second encoder's pooled text embedding and the six size/crop numbers.
        projection_class_embeddings_input_dim=projection_dim + 6 * time_embed_dim,
    )
    with tempfile.TemporaryDirectory() as tokenizer_dir:
        _write_tokenizer_files(Path(tokenizer_dir))
        vocab, merges = (
            str(Path(tokenizer_dir) / "vocab.json"),
            str(Path(tokenizer_dir) / "merges.txt"),
        )
        tokenizer = CLIPTokenizer(vocab, merges, model_max_length=77)
        # SDXL's second tokenizer pads with "!", not with its end token.
        tokenizer_2 = CLIPTokenizer(vocab, merges, model_max_length=77, pad_token="!")
    text_encoder = CLIPTextModel(_text_encoder_config(tokenizer))
    text_encoder_2 = CLIPTextModelWithProjection(
        _text_encoder_config(tokenizer_2, hidden_size=text_hidden_2, projection_dim=projection_dim)
    )
    # SDXL base's scheduler.
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        steps_offset=1,
        timestep_spacing="leading",
        interpolation_type="linear",
        prediction_type="epsilon",
    )
    vae = _passthrough_vae()
    # SDXL's VAE decodes in float32 whatever the pipeline's dtype; the tiny one says so too.
    vae.register_to_config(force_upcast=True)
    pipeline = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=scheduler,
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )
    pipeline.set_progress_bar_config(disable=True)
    checker, processor = _tiny_safety_checker(pipeline, FLAGGED_XL_REQUEST)
    pipeline.register_modules(feature_extractor=processor)
    pipeline.save_pretrained(target)
    # StableDiffusionXLPipeline has no safety checker component, so save_pretrained skips it;
    # the service loads it from the folder's safety_checker/ all the same (worker/safety.py).
    checker.save_pretrained(target / "safety_checker")
    from worker.single_file import save_single_file

    save_single_file(pipeline, target.with_suffix(".safetensors"))


def _ensure(cache_dir: Path, name: str, build: Callable[[Path], None]) -> Path:
    """Build a pipeline folder `name` once into `cache_dir`; `build` writes the folder it is
    given and may write a single-file checkpoint beside it (the folder's name + .safetensors)."""
    target = cache_dir / name
    if (target / "model_index.json").is_file():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=cache_dir, prefix=".building-"))
    try:
        build(staging / "model")
        # The checkpoint first: a folder in place means both are.
        checkpoint = staging / "model.safetensors"
        if checkpoint.is_file():
            checkpoint.replace(target.with_suffix(".safetensors"))
        try:
            (staging / "model").rename(target)
        except OSError:
            # Another process finished first; its copy is as good as ours.
            if not (target / "model_index.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def ensure_tiny_model(cache_dir: Path) -> Path:
    """Build the tiny pipeline once into `cache_dir`; later calls reuse it."""
    return _ensure(cache_dir, f"tiny-sd15-{_TINY_VERSION}", lambda target: _build(target, 0))


def ensure_second_tiny_model(cache_dir: Path) -> Path:
    """Another tiny pipeline, the same shape with other random weights; beside its folder lies
    the same model as one single-file checkpoint (`.safetensors`, the original layout)."""
    return _ensure(cache_dir, f"second-tiny-sd15-{_TINY_VERSION}", lambda target: _build(target, 1))


def ensure_tiny_xl_model(cache_dir: Path) -> Path:
    """Build the tiny SDXL pipeline once into `cache_dir`; later calls reuse it. Its folder
    has SDXL's components and a tiny safety checker that flags FLAGGED_XL_REQUEST's image;
    beside it lies the same model as one single-file checkpoint (`.safetensors`, SDXL's
    original layout)."""
    return _ensure(cache_dir, f"tiny-sdxl-{_TINY_XL_VERSION}", lambda target: _build_xl(target, 2))
