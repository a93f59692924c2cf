"""What a render is asked for and what it gives back: the types the render core, the job kinds,
the executor and the job runner share. Nothing here touches a model."""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from PIL.Image import Image

from shared.schema import GenerationRequest, Scheduler

# Called after each denoising step has finished on the device, with (steps done, total steps).
StepCallback = Callable[[int, int], None]
# Called after a step at which some images were asked a preview, once the step has finished on
# the device: (steps done, total steps, {item index within the batch: RGB preview}).
PreviewCallback = Callable[[int, int, dict[int, Image]], None]
# (name, scale) of each LoRA adapter of a batch, sorted by name: what jobs must share to batch.
AdapterSet = tuple[tuple[str, float], ...]
# What must be equal for two jobs to share a pipeline call.
BatchKey = tuple[Any, ...]


class NonFiniteImage(Exception):
    """The decoder produced NaN or infinite pixels (an fp16 overflow): the image would be black."""

    def __init__(self) -> None:
        super().__init__(
            "the image came out with NaN or infinite pixels (a numerical overflow on the GPU); "
            "another seed or fewer guidance usually renders"
        )


# One entry per image of a batch: the image, or why it has none.
RenderedImages = list[Image | NonFiniteImage]


@dataclass(frozen=True)
class PreviewAsk:
    """A small preview of an image while it renders: after steps N, 2N, 3N, ... (1-based, as
    `StepCallback` counts them; the last step too when it is a multiple of N)."""

    every_n_steps: int
    # The preview's longest side in pixels; the aspect ratio is kept and it is never larger than
    # the image.
    max_size: int

    def __post_init__(self) -> None:
        if self.every_n_steps < 1 or self.max_size < 1:
            raise ValueError("a preview needs every_n_steps >= 1 and max_size >= 1")

    def due(self, step: int) -> bool:
        """Whether a preview is due after `step` (1-based)."""
        return step % self.every_n_steps == 0

    def size(self, width: int, height: int) -> tuple[int, int]:
        """The preview's (width, height) for an image of `width` x `height`."""
        scale = min(1.0, self.max_size / max(width, height))
        return max(1, round(width * scale)), max(1, round(height * scale))


@dataclass(frozen=True)
class RenderItem:
    """One image: its own prompt, negative prompt and seed, and for image-to-image its starting
    image (and for inpainting its mask), or for ControlNet its control map."""

    prompt: str
    negative_prompt: str
    seed: int
    init_image: Image | None = None
    mask_image: Image | None = None
    control_image: Image | None = None
    # A preview every few steps while it renders; None for none.
    preview: PreviewAsk | None = None


@dataclass(frozen=True)
class RenderBatch:
    """Images that share one pipeline call: same size, steps, scheduler and guidance."""

    items: tuple[RenderItem, ...]
    width: int
    height: int
    num_inference_steps: int
    guidance_scale: float
    scheduler: Scheduler
    # Image-to-image and inpainting: how far from the starting images; None for text-to-image.
    strength: float | None = None
    # LoRA adapters and their scales, sorted by name; () for none.
    loras: AdapterSet = ()
    # ControlNet: the control type and how strongly it conditions; None without control.
    control_type: str | None = None
    control_scale: float = 1.0

    @classmethod
    def from_request(
        cls,
        request: GenerationRequest,
        init_image: Image | None = None,
        mask_image: Image | None = None,
        control_image: Image | None = None,
    ) -> "RenderBatch":
        asked = request.preview
        preview = None if asked is None else PreviewAsk(asked.every_n_steps, asked.max_size)
        items = tuple(
            RenderItem(
                request.prompt,
                request.negative_prompt,
                seed,
                init_image,
                mask_image,
                control_image,
                preview,
            )
            for seed in request.image_seeds()
        )
        control = request.control
        return cls(
            items=items,
            width=request.width,
            height=request.height,
            num_inference_steps=request.num_inference_steps,
            guidance_scale=request.guidance_scale,
            scheduler=request.scheduler,
            strength=None if init_image is None else request.image_strength,
            loras=adapter_set(request),
            control_type=None if control is None else control.type,
            control_scale=1.0 if control is None else control.conditioning_scale,
        )

    @property
    def inpainting(self) -> bool:
        return self.items[0].mask_image is not None

    @property
    def guided(self) -> bool:
        """Classifier-free guidance: the UNet sees each image twice (with and without prompt)."""
        return self.guidance_scale > 1

    @property
    def pixels(self) -> int:
        """What the batch weighs on the device: its images' pixels."""
        return len(self.items) * self.width * self.height


def adapter_set(request: GenerationRequest) -> AdapterSet:
    """The request's adapters as a batch holds them: sorted, so the order named never matters."""
    return tuple(sorted((lora.name, lora.scale) for lora in request.loras))


def batch_key(batch: RenderBatch) -> BatchKey:
    """Everything in a batch but its items (and whether its items bring images and masks)."""
    return (
        batch.width,
        batch.height,
        batch.num_inference_steps,
        batch.guidance_scale,
        batch.scheduler,
        batch.strength,
        batch.inpainting,
        batch.loras,
        batch.control_type,
        batch.control_scale,
    )
