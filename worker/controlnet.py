"""ControlNet models, loaded per control type, and the control maps computed from pictures
(on a job's own thread, before it reaches the GPU). The render core runs them: worker/kinds.py."""

import logging
from pathlib import Path

import numpy as np
import torch
from diffusers import ControlNetModel
from PIL import Image as PILImage
from PIL.Image import Image

# What T2I_CONTROLNETS names to get the tiny offline ControlNet of the tiny model.
TINY_CONTROLNET_ID = "tiny"
# ... and of the tiny SDXL model.
TINY_XL_CONTROLNET_ID = "tiny-xl"

log = logging.getLogger(__name__)

# The thresholds the canny ControlNet's own annotator uses.
CANNY_LOW, CANNY_HIGH = 100, 200


def canny_map(image: Image) -> Image:
    """White edges on black, three channels: what the canny ControlNet was trained on."""
    # OpenCV only where a job asks for a map: not on the worker's start path.
    import cv2

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
    """The ControlNet of each control type, on `device`; "tiny" and "tiny-xl" are the tiny
    offline ones of the tiny models."""
    loaded = {}
    for control_type, source in sources.items():
        location = source
        if source == TINY_CONTROLNET_ID:
            # Imported only where asked for: it builds test models.
            from worker.tiny_customization import ensure_tiny_controlnet

            location = str(ensure_tiny_controlnet(cache_dir))
        elif source == TINY_XL_CONTROLNET_ID:
            from worker.tiny_customization import ensure_tiny_xl_controlnet

            location = str(ensure_tiny_xl_controlnet(cache_dir))
        controlnet = ControlNetModel.from_pretrained(location, torch_dtype=dtype)
        loaded[control_type] = controlnet.to(device)
        log.info("loaded the %s ControlNet from %s", control_type, location)
    return loaded
