"""A job's live previews: the render core hands them over on the GPU thread, and they are
encoded and written on the reporter's thread, the latest only (a newer one replaces one that
waits, so a slow Redis drops previews instead of queueing them)."""

import base64
import io
from collections.abc import Callable

from PIL import Image as PILImage
from PIL.Image import Image

from shared.schema import PreviewOut, PreviewSpec
from worker.reporter import Reporter

_QUALITY = 80
_PIL_FORMATS = {"webp": "WEBP", "jpeg": "JPEG"}


def preview_of(images: list[Image], spec: PreviewSpec, step: int, total: int) -> PreviewOut:
    """The job's images side by side, encoded as the request asked, as a data URL."""
    width = sum(image.width for image in images)
    height = max(image.height for image in images)
    strip = PILImage.new("RGB", (width, height))
    left = 0
    for image in images:
        strip.paste(image.convert("RGB"), (left, 0))
        left += image.width
    buffer = io.BytesIO()
    # JPEG keeps full-resolution colour: halved, a small preview's fine colour detail is lost
    # (WebP's lossy mode always halves it).
    options = {"subsampling": 0} if spec.format == "jpeg" else {}
    strip.save(buffer, format=_PIL_FORMATS[spec.format], quality=_QUALITY, **options)
    encoded = base64.b64encode(buffer.getvalue()).decode()
    return PreviewOut(
        step=step,
        total=total,
        width=width,
        height=height,
        image=f"data:image/{spec.format};base64,{encoded}",
    )


class PreviewWriter:
    """Called on the GPU thread with a job's previews at a step: it only posts them."""

    def __init__(
        self,
        reporter: Reporter,
        key: str,
        spec: PreviewSpec,
        write: Callable[[PreviewOut], object],
    ) -> None:
        self._reporter = reporter
        self._key = key
        self._spec = spec
        self._write = write

    def __call__(self, step: int, total: int, images: list[Image]) -> None:
        if images:
            self._reporter.post(
                self._key, lambda: self._write(preview_of(images, self._spec, step, total))
            )
