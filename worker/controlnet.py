"""ControlNet from the warm pipeline's own modules, and the control maps computed from pictures.

diffusers' ControlNet pipeline is made with `from_pipe` once per control type: it shares the
UNet, VAE, text encoder and tokenizer, so only the ControlNet itself is loaded. The UNet runs
eager under control (the ControlNet's residuals are inputs the warmed graphs never saw).
"""

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np
import torch
from diffusers import ControlNetModel, StableDiffusionControlNetPipeline
from PIL import Image as PILImage
from PIL.Image import Image

from worker.pipeline import (
    RenderBatch,
    RenderedImages,
    StepCallback,
    StepReporter,
    resized,
    to_images,
)
from worker.tiny_customization import TINY_CONTROLNET_ID, ensure_tiny_controlnet

if TYPE_CHECKING:
    from worker.pipeline import DiffusionRenderer

log = logging.getLogger(__name__)

# The thresholds the canny ControlNet's own annotator uses.
CANNY_LOW, CANNY_HIGH = 100, 200


def canny_map(image: Image) -> Image:
    """White edges on black, three channels: what the canny ControlNet was trained on."""
    edges = cv2.Canny(np.asarray(image.convert("RGB")), CANNY_LOW, CANNY_HIGH)
    return PILImage.fromarray(np.stack([edges] * 3, axis=2))


# Control types whose map the worker can compute from a picture (`preprocess: true`).
PREPROCESSORS = {"canny": canny_map}


def control_map(image: Image, control_type: str, preprocess: bool) -> Image:
    """The image the ControlNet sees; a picture is turned into its map where a preprocessor is
    known, and any other image is taken as the map itself."""
    preprocessor = PREPROCESSORS.get(control_type)
    if preprocess and preprocessor is not None:
        return preprocessor(image)
    return image.convert("RGB")


def load_controlnets(
    sources: dict[str, str], cache_dir: Path, dtype: torch.dtype, device: torch.device
) -> dict[str, ControlNetModel]:
    """The ControlNet of each control type, on `device`; "tiny" is the tiny offline one."""
    loaded = {}
    for control_type, source in sources.items():
        tiny = source == TINY_CONTROLNET_ID
        location = str(ensure_tiny_controlnet(cache_dir)) if tiny else source
        controlnet = ControlNetModel.from_pretrained(location, torch_dtype=dtype)
        loaded[control_type] = controlnet.to(device)
        log.info("loaded the %s ControlNet from %s", control_type, location)
    return loaded


class ControlNetRenderer:
    """Renders batches conditioned on control maps, one pipeline per control type."""

    def __init__(self, renderer: "DiffusionRenderer") -> None:
        self._renderer = renderer
        self._pipelines: dict[str, StableDiffusionControlNetPipeline] = {}

    def _pipeline(self, control_type: str) -> StableDiffusionControlNetPipeline:
        if control_type not in self._pipelines:
            controlnet = self._renderer.controlnets.get(control_type)
            if controlnet is None:
                raise ValueError(f"this worker has no {control_type!r} ControlNet")
            pipeline = StableDiffusionControlNetPipeline.from_pipe(
                self._renderer.pipeline, controlnet=controlnet
            )
            pipeline.set_progress_bar_config(disable=True)
            self._pipelines[control_type] = pipeline
        return self._pipelines[control_type]

    def render(self, batch: RenderBatch, on_step: StepCallback | None) -> RenderedImages:
        assert batch.control_type is not None
        renderer = self._renderer
        pipeline = self._pipeline(batch.control_type)
        pipeline.scheduler = renderer.scheduler(batch.scheduler)
        steps = StepReporter(renderer.device, on_step, batch.num_inference_steps)
        maps = []
        for item in batch.items:
            assert item.control_image is not None, "every item of a controlled batch has a map"
            maps.append(resized(item.control_image, batch.width, batch.height))
        pixels = pipeline(
            **renderer.conditioning(batch.items, renderer.prompt_chunks(batch)),
            image=maps,
            width=batch.width,
            height=batch.height,
            num_inference_steps=batch.num_inference_steps,
            guidance_scale=batch.guidance_scale,
            controlnet_conditioning_scale=batch.control_scale,
            generator=[torch.Generator("cpu").manual_seed(item.seed) for item in batch.items],
            output_type="pt",
            callback_on_step_end=steps.step_end,
        ).images
        steps.finish()
        return to_images(pixels)
