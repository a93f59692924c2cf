"""Image-to-image and inpainting from the warm text-to-image pipeline's own modules.

diffusers' img2img and inpainting pipelines are made with `from_pipe`: they share the UNet (with
its compiled forward), VAE, text encoder and tokenizer, so no weight is loaded twice. Each image
keeps its own CPU generator, as in text-to-image, so an image is the one it would get alone.
"""

from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline
from PIL.Image import Image

from worker.pipeline import (
    RenderBatch,
    RenderedImages,
    StepCallback,
    StepReporter,
    resized,
    to_images,
)

if TYPE_CHECKING:
    from worker.pipeline import DiffusionRenderer


def denoising_steps(num_inference_steps: int, strength: float) -> int:
    """The steps an image-to-image call runs: the last `strength` of the schedule."""
    return min(int(num_inference_steps * strength), num_inference_steps)


def _given(image: Image | None) -> Image:
    assert image is not None, "every item of an image-conditioned batch brings its images"
    return image


class ImageConditionedRenderer:
    """Renders batches that start from images (and, for inpainting, masks)."""

    def __init__(self, renderer: "DiffusionRenderer") -> None:
        self._renderer = renderer
        self._img2img = StableDiffusionImg2ImgPipeline.from_pipe(renderer.pipeline)
        self._inpaint = StableDiffusionInpaintPipeline.from_pipe(renderer.pipeline)
        for pipeline in (self._img2img, self._inpaint):
            pipeline.set_progress_bar_config(disable=True)

    def render(self, batch: RenderBatch, on_step: StepCallback | None) -> RenderedImages:
        assert batch.strength is not None
        renderer = self._renderer
        pipeline = self._inpaint if batch.inpainting else self._img2img
        pipeline.scheduler = renderer.scheduler(batch.scheduler)
        total = denoising_steps(batch.num_inference_steps, batch.strength)
        steps = StepReporter(renderer.device, on_step, total)
        width, height = batch.width, batch.height
        inits = [resized(_given(item.init_image), width, height) for item in batch.items]
        arguments: dict[str, Any] = {
            **renderer.conditioning(batch.items, renderer.prompt_chunks(batch)),
            "image": inits,
            "strength": batch.strength,
            "num_inference_steps": batch.num_inference_steps,
            "guidance_scale": batch.guidance_scale,
            "generator": [torch.Generator("cpu").manual_seed(item.seed) for item in batch.items],
            "output_type": "pt",
            "callback_on_step_end": steps.step_end,
        }
        masks: list[Image] = []
        if batch.inpainting:
            masks = [resized(_given(item.mask_image), width, height) for item in batch.items]
            arguments.update(mask_image=masks, width=width, height=height)
        pixels = pipeline(**arguments).images
        steps.finish()
        if batch.inpainting:
            pixels = _keep_unmasked(pixels, inits, masks)
        return to_images(pixels)


def _keep_unmasked(pixels: torch.Tensor, inits: list[Image], masks: list[Image]) -> torch.Tensor:
    """Where the mask is black the result is the input image itself, as popular SD UIs paste it
    back: a VAE round trip would otherwise blur what was meant to stay."""

    def as_tensor(image: Image, mode: str) -> torch.Tensor:
        array = torch.from_numpy(np.asarray(image.convert(mode), dtype=np.float32))
        return array.reshape(image.height, image.width, -1).permute(2, 0, 1) / 255

    device, dtype = pixels.device, pixels.dtype
    original = torch.stack([as_tensor(image, "RGB") for image in inits]).to(device, dtype)
    repaint = torch.stack([as_tensor(mask, "L") for mask in masks]).to(device) >= 0.5
    return torch.where(repaint, pixels, original)
