"""SD 1.5's safety checker on every image, and what happens to an image it flags.

The checker runs on the task threads, after the GPU executor has handed the images back: the next
batch is already rendering meanwhile. The jobs of a batch finish together, so their checks are
combined: each task prepares its images' CLIP input on its own thread and queues it, and whichever
task holds the checker next checks every queued job's images in one call. Its black-image
replacement is never used; the job's safety action decides."""

import logging
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
from PIL import ImageFilter
from PIL.Image import Image
from transformers import CLIPImageProcessor

from shared.schema import ImageSafety, SafetyAction
from worker.models import ModelLoadError, ModelSource, resolve

log = logging.getLogger(__name__)

# A flagged image is blurred this strongly: the radius is this fraction of its longer side.
BLUR_RADIUS_FRACTION = 1 / 16


@dataclass(eq=False)
class _Check:
    """One job's images, queued for the next combined call, and their flags once it ran."""

    clip_input: torch.Tensor
    flags: list[bool] | None = None
    error: BaseException | None = None


class SafetyChecker:
    """StableDiffusionSafetyChecker with its CLIP image processor, on one device."""

    def __init__(
        self,
        checker: StableDiffusionSafetyChecker,
        processor: CLIPImageProcessor,
        device: torch.device,
    ) -> None:
        self._checker = checker
        self._processor = processor
        self._device = device
        # Held for a combined call; the queue of checks waiting for one has its own lock.
        self._lock = threading.Lock()
        self._queue_lock = threading.Lock()
        self._queued: list[_Check] = []
        # Checker calls made: fewer than the jobs checked where checks were combined.
        self.calls = 0

    @property
    def dtype(self) -> torch.dtype:
        return self._checker.dtype

    @classmethod
    def load(
        cls,
        model: ModelSource,
        checker_id: str | None,
        cache_dir: Path,
        device: torch.device,
        dtype: torch.dtype,
    ) -> "SafetyChecker":
        """The checker of `checker_id` (a hub id or a diffusers directory with
        `safety_checker/` and `feature_extractor/`), or else the one the model ships."""
        source = resolve(checker_id, cache_dir) if checker_id else model.diffusers_layout
        try:
            checker = StableDiffusionSafetyChecker.from_pretrained(
                source, subfolder="safety_checker", dtype=dtype
            )
            processor = CLIPImageProcessor.from_pretrained(source, subfolder="feature_extractor")
        except (OSError, ValueError) as exc:
            raise ModelLoadError(
                f"could not load the safety checker from {source!r}: {exc}\n"
                "Point T2I_SAFETY_CHECKER_ID at a checker (a hub id or a directory with "
                "safety_checker/ and feature_extractor/), or turn it off explicitly with "
                "T2I_SAFETY_CHECKER=false."
            ) from exc
        log.info("safety checker from %s on %s", source, device)
        return cls(checker.to(device).eval(), processor, device)

    def flagged(self, images: list[Image]) -> list[bool]:
        """Whether each image has a concept the checker flags; checked in one call with the
        images of every other job waiting meanwhile."""
        if not images:
            return []
        pixels = self._processor(images=images, return_tensors="pt").pixel_values
        check = _Check(pixels.to(self._device, self._checker.dtype))
        with self._queue_lock:
            self._queued.append(check)
        with self._lock:
            if check.flags is None and check.error is None:
                with self._queue_lock:
                    combined, self._queued = self._queued, []
                self._check_all(combined)
        if check.error is not None:
            raise check.error
        assert check.flags is not None
        return check.flags

    @torch.inference_mode()
    def _check_all(self, checks: list[_Check]) -> None:
        """One checker call for the images of every check; each gets its own flags, or the
        call's error."""
        try:
            clip_input = torch.cat([check.clip_input for check in checks])
            # The checker blacks out flagged images in what it is given: give it placeholders.
            placeholders = np.zeros((len(clip_input), 1, 1, 3), dtype=np.float32)
            self.calls += 1
            _, flags = self._checker(clip_input=clip_input, images=placeholders)
        except Exception as exc:
            for check in checks:
                check.error = exc
            return
        offset = 0
        for check in checks:
            count = len(check.clip_input)
            check.flags = [bool(flag) for flag in flags[offset : offset + count]]
            offset += count


@dataclass(frozen=True)
class Verdict:
    """One image after the safety action: the image to store (None: blocked) and its entry."""

    image: Image | None
    safety: ImageSafety


def apply_action(image: Image, flagged: bool | None, action: SafetyAction) -> Verdict:
    """`flagged` None: the checker is off, the image goes out unchecked."""
    if flagged is None:
        return Verdict(image, ImageSafety(checked=False))
    if not flagged:
        return Verdict(image, ImageSafety(checked=True))
    safety = ImageSafety(checked=True, flagged=True, action=action, reason="nsfw_content")
    if action == "block":
        return Verdict(None, safety)
    if action == "blur":
        radius = max(image.size) * BLUR_RADIUS_FRACTION
        return Verdict(image.filter(ImageFilter.GaussianBlur(radius)), safety)
    return Verdict(image, safety)
