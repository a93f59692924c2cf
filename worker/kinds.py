"""The kinds of job the render core serves, each a small strategy: where a batch's denoising
starts and what each step adds. They follow diffusers' SD 1.5 pipelines step for step (text-to-
image, image-to-image, inpainting, ControlNet) but run inside the core's one loop, so every kind
keeps the modules' dtype, the compiled UNet and the adapters in their slots. They serve SD 1.5 and
SDXL models alike: the core hands them the family's conditioning."""

from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from diffusers import ControlNetModel
from diffusers.image_processor import VaeImageProcessor
from PIL import Image as PILImage
from PIL.Image import Image

from worker.controlnet import load_controlnets
from worker.pipeline import (
    Conditioning,
    Denoising,
    DiffusionRenderer,
    JobKind,
    SpeedLevers,
    Start,
    resized,
)
from worker.render_types import RenderBatch, RenderItem
from worker.simulated import SimulatedRenderer, is_simulated


def _given(image: Image | None) -> Image:
    assert image is not None, "every item of this batch brings its images"
    return image


class _Kind:
    """What most kinds share: no modules of their own, and the plain UNet graph serves them."""

    def modules(self) -> dict[str, torch.nn.Module]:
        return {}

    def warm_up_batch(self, count: int, width: int, height: int) -> RenderBatch | None:
        return None


class TextToImage(_Kind):
    """Pure noise, denoised over the whole schedule."""

    name = "text"

    def accepts(self, batch: RenderBatch) -> bool:
        return batch.strength is None and batch.control_type is None

    def start(self, start: Start) -> Denoising:
        core, batch, items, scheduler = start.core, start.batch, start.items, start.scheduler
        timesteps = core.timesteps(scheduler, batch.num_inference_steps)
        shape = core.latent_shape(len(items), batch.width, batch.height)
        latents = core.noise(shape, start.generators) * scheduler.init_noise_sigma
        return Denoising(latents, timesteps)


class _FromImages(_Kind):
    """What image-to-image and inpainting share: the starting images as latents."""

    @staticmethod
    def _pixels(core: DiffusionRenderer, images: list[Image], batch: RenderBatch) -> torch.Tensor:
        processor: VaeImageProcessor = core.pipeline.image_processor
        sized = [resized(image, batch.width, batch.height) for image in images]
        return processor.preprocess(sized, height=batch.height, width=batch.width)


class ImageToImage(_FromImages):
    """The starting images' latents, noised to where the last `strength` of the schedule
    starts."""

    name = "image-to-image"

    def accepts(self, batch: RenderBatch) -> bool:
        return batch.strength is not None and not batch.inpainting

    def start(self, start: Start) -> Denoising:
        core, batch, items, scheduler = start.core, start.batch, start.items, start.scheduler
        assert batch.strength is not None
        timesteps = core.timesteps(scheduler, batch.num_inference_steps, batch.strength)
        pixels = self._pixels(core, [_given(item.init_image) for item in items], batch)
        image_latents = core.encode_images(pixels, start.generators)
        noise = core.noise(image_latents.shape, start.generators)
        signal_part, noise_part = core.noise_coefficients(scheduler, timesteps[0])
        return Denoising(signal_part * image_latents + noise_part * noise, timesteps)


class Inpainting(_FromImages):
    """Image-to-image where the mask is white; where it is black, the input image's latents
    (noised to each step's level) replace the result after every step, and its pixels are pasted
    back at the end, as popular SD UIs do (a VAE round trip would blur what was meant to stay)."""

    name = "inpainting"

    def accepts(self, batch: RenderBatch) -> bool:
        return batch.strength is not None and batch.inpainting

    def start(self, start: Start) -> Denoising:
        core, batch, items, scheduler = start.core, start.batch, start.items, start.scheduler
        assert batch.strength is not None
        timesteps = core.timesteps(scheduler, batch.num_inference_steps, batch.strength)
        inits = [resized(_given(item.init_image), batch.width, batch.height) for item in items]
        masks = [resized(_given(item.mask_image), batch.width, batch.height) for item in items]
        image_latents = core.encode_images(self._pixels(core, inits, batch), start.generators)
        noise = core.noise(image_latents.shape, start.generators)
        if batch.strength >= 1.0:
            latents = noise * scheduler.init_noise_sigma
        else:
            signal_part, noise_part = core.noise_coefficients(scheduler, timesteps[0])
            latents = signal_part * image_latents + noise_part * noise
        masks_processor = _image_processor(
            core, do_normalize=False, do_binarize=True, do_convert_grayscale=True
        )
        repaint = masks_processor.preprocess(masks, height=batch.height, width=batch.width)
        repaint_latents = torch.nn.functional.interpolate(
            repaint, size=tuple(image_latents.shape[2:])
        ).to(core.device, core.dtype)
        keep_latents = 1 - repaint_latents

        def after_step(index: int, stepped: torch.Tensor) -> torch.Tensor:
            if index + 1 < len(timesteps):
                signal_part, noise_part = core.noise_coefficients(scheduler, timesteps[index + 1])
                kept = signal_part * image_latents + noise_part * noise
            else:
                kept = image_latents
            return keep_latents * kept + repaint_latents * stepped

        def finish(pixels: torch.Tensor) -> torch.Tensor:
            return _keep_unmasked(pixels, inits, masks)

        return Denoising(latents, timesteps, after_step=after_step, finish=finish)


def _image_processor(core: DiffusionRenderer, **options: bool) -> VaeImageProcessor:
    """diffusers' image preprocessing at the core's VAE scale (cheap to make: a config)."""
    return VaeImageProcessor(vae_scale_factor=core.pipeline.vae_scale_factor, **options)


def _keep_unmasked(pixels: torch.Tensor, inits: list[Image], masks: list[Image]) -> torch.Tensor:
    """Where the mask is black the result is the input image itself."""

    def as_tensor(image: Image, mode: str) -> torch.Tensor:
        array = torch.from_numpy(np.asarray(image.convert(mode), dtype=np.float32))
        return array.reshape(image.height, image.width, -1).permute(2, 0, 1) / 255

    device, dtype = pixels.device, pixels.dtype
    count = len(inits)
    original = torch.stack([as_tensor(image, "RGB") for image in inits]).to(device, dtype)
    repaint = torch.stack([as_tensor(mask, "L") for mask in masks]).to(device) >= 0.5
    return torch.cat([torch.where(repaint, pixels[:count], original), pixels[count:]])


class ControlNet:
    """Text-to-image with a ControlNet's residuals added to the UNet's at every step, one
    ControlNet per control type (in the core's dtype, on its device)."""

    name = "controlnet"

    def __init__(self, controlnets: dict[str, ControlNetModel]) -> None:
        self._controlnets = dict(controlnets)

    @property
    def control_types(self) -> list[str]:
        return sorted(self._controlnets)

    def accepts(self, batch: RenderBatch) -> bool:
        return batch.control_type is not None

    def modules(self) -> dict[str, torch.nn.Module]:
        return {f"controlnet:{name}": model for name, model in self._controlnets.items()}

    def warm_up_batch(self, count: int, width: int, height: int) -> RenderBatch | None:
        """A batch with a blank map: the UNet graph with residuals gets compiled."""
        if not self._controlnets:
            return None
        blank = PILImage.new("RGB", (width, height))
        return RenderBatch(
            items=tuple(
                RenderItem("warm-up", "", index, control_image=blank) for index in range(count)
            ),
            width=width,
            height=height,
            num_inference_steps=3,
            guidance_scale=7.5,
            scheduler="dpmpp_2m",
            control_type=min(self._controlnets),
        )

    def start(self, start: Start) -> Denoising:
        core, batch, items = start.core, start.batch, start.items
        assert batch.control_type is not None
        controlnet = self._controlnets.get(batch.control_type)
        if controlnet is None:
            raise ValueError(f"this worker has no {batch.control_type!r} ControlNet")
        plan = TextToImage().start(start)
        maps = [resized(_given(item.control_image), batch.width, batch.height) for item in items]
        condition = _image_processor(core, do_convert_rgb=True, do_normalize=False).preprocess(
            maps, height=batch.height, width=batch.width
        )
        condition = condition.to(core.device, core.dtype)
        if batch.guided:
            condition = torch.cat([condition] * 2)
        scale = batch.control_scale

        def unet_inputs(
            model_input: torch.Tensor, timestep: torch.Tensor, conditioning: Conditioning
        ) -> dict[str, Any]:
            down, middle = controlnet(
                model_input,
                timestep,
                **conditioning.unet_arguments(),
                controlnet_cond=condition,
                conditioning_scale=scale,
                guess_mode=False,
                return_dict=False,
            )
            return {
                "down_block_additional_residuals": down,
                "mid_block_additional_residual": middle,
            }

        plan.unet_inputs = unet_inputs
        return plan


def standard_kinds(controlnets: dict[str, ControlNetModel] | None = None) -> list[JobKind]:
    """Every kind of job this service renders."""
    return [TextToImage(), ImageToImage(), Inpainting(), ControlNet(controlnets or {})]


def load_renderer(
    model_id: str,
    cache_dir: Path,
    device: str = "auto",
    levers: SpeedLevers | None = None,
    *,
    controlnets: dict[str, str] | None = None,
    preview_vae: str | None = None,
    **options: Any,
) -> DiffusionRenderer:
    """A render core serving every kind of job, with these ControlNets (by control type: a hub
    id or directory, or "tiny"), in the core's dtype on its device; previews decoded by the
    tiny autoencoder `preview_vae` (a hub id or directory, or "tiny"), or where None, by a
    linear map fitted to the model's VAE."""
    if is_simulated(model_id):
        # A benchmark aid (worker/simulated.py): sleeps for the render, loads no model.
        return cast(DiffusionRenderer, SimulatedRenderer(model_id))
    renderer = DiffusionRenderer.load(
        model_id, cache_dir, device, levers, preview_vae=preview_vae, **options
    )
    loaded = load_controlnets(controlnets or {}, cache_dir, renderer.dtype, renderer.device)
    renderer.kinds = standard_kinds(loaded)
    return renderer
