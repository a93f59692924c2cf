"""The tiny SDXL model, its adapters and its ControlNet, checked with diffusers' own pipelines
(not the service's): what the render core may rely on."""

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import (
    ControlNetModel,
    DPMSolverMultistepScheduler,
    StableDiffusionXLControlNetPipeline,
    StableDiffusionXLPipeline,
)
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
from PIL import Image
from transformers import CLIPImageProcessor

from worker.tiny_customization import (
    TINY_XL_LORAS,
    ensure_tiny_xl_controlnet,
    ensure_tiny_xl_loras,
)
from worker.tiny_model import FLAGGED_XL_REQUEST, ensure_tiny_xl_model, render_request

# Mean absolute difference of 8-bit pixels, in [0, 1], that counts as a visible change.
VISIBLE = 0.005


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tiny-xl")


@pytest.fixture(scope="module")
def pipeline(cache: Path) -> StableDiffusionXLPipeline:
    loaded = StableDiffusionXLPipeline.from_pretrained(ensure_tiny_xl_model(cache))
    loaded.set_progress_bar_config(disable=True)
    return loaded


def _render(pipeline: Any, seed: int, **extra: Any) -> Image.Image:
    """FLAGGED_XL_REQUEST with `seed`, rendered as the service renders it (DPM++ 2M, no negative
    prompt)."""
    pipeline.scheduler = DPMSolverMultistepScheduler.from_config(
        pipeline.scheduler.config, algorithm_type="dpmsolver++", solver_order=2
    )
    return render_request(pipeline, FLAGGED_XL_REQUEST, seed, **extra)


def _difference(a: Image.Image, b: Image.Image) -> float:
    return float(np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).mean() / 255)


def test_it_renders_512_in_two_steps_and_only_the_flagged_request_is_flagged(
    pipeline: StableDiffusionXLPipeline, cache: Path
) -> None:
    folder = ensure_tiny_xl_model(cache)
    checker = StableDiffusionSafetyChecker.from_pretrained(folder / "safety_checker").eval()
    processor = CLIPImageProcessor.from_pretrained(folder / "feature_extractor")
    seeds = [int(FLAGGED_XL_REQUEST["seed"]), *range(6)]
    images = [_render(pipeline, seed) for seed in seeds]
    assert all(image.size == (512, 512) for image in images)
    pixels = processor(images=images, return_tensors="pt").pixel_values
    with torch.no_grad():
        _, flags = checker(clip_input=pixels, images=np.zeros((len(images), 1, 1, 3)))
    assert [bool(flag) for flag in flags] == [True] + [False] * 6


def test_each_lora_has_unet_and_both_text_encoders_layers_and_changes_the_image(
    pipeline: StableDiffusionXLPipeline, cache: Path
) -> None:
    registry = ensure_tiny_xl_loras(cache)
    for name in TINY_XL_LORAS:
        state, _ = StableDiffusionXLPipeline.lora_state_dict(registry / f"{name}.safetensors")
        prefixes = {key.split(".", 1)[0] for key in state}
        assert prefixes == {"unet", "text_encoder", "text_encoder_2"}
    name = next(iter(TINY_XL_LORAS))
    plain = _render(pipeline, 0)
    pipeline.load_lora_weights(registry, weight_name=f"{name}.safetensors")
    try:
        assert _difference(_render(pipeline, 0), plain) > VISIBLE
    finally:
        pipeline.unload_lora_weights()


def test_the_controlnet_loads_and_changes_the_image(
    pipeline: StableDiffusionXLPipeline, cache: Path
) -> None:
    controlnet = ControlNetModel.from_pretrained(ensure_tiny_xl_controlnet(cache))
    controlled = StableDiffusionXLControlNetPipeline(**pipeline.components, controlnet=controlnet)
    controlled.set_progress_bar_config(disable=True)
    # A white square on black: what an edge map looks like to the ControlNet.
    control = np.zeros((512, 512, 3), np.uint8)
    control[128:384, 128:384] = 255
    image = Image.fromarray(control)
    plain = _render(controlled, 0, image=image, controlnet_conditioning_scale=0.0)
    assert _difference(_render(controlled, 0, image=image), plain) > VISIBLE
