"""A request's input images (image-to-image, inpainting, ControlNet): read from base64 or fetched
from a URL through the webhooks' SSRF guard, checked with Pillow and stored as PNG before the job
is queued. Every way an image can be wrong is a 422 here, never a failed job later."""

import base64
import binascii
import hashlib
import io
import re
import warnings
from dataclasses import dataclass

import httpx
from PIL import Image, UnidentifiedImageError

from shared.errors import ErrorType, ServiceError
from shared.schema import GenerationRequest
from shared.settings import ApiSettings, WebhookSettings
from shared.webhooks import WebhookRefused, check_webhook_url, pinned_url

_FORMATS = {"PNG", "JPEG", "WEBP"}
_DATA_URL = re.compile(r"^data:image/[a-z+.-]+;base64,", re.IGNORECASE)
_URL = re.compile(r"^https?://", re.IGNORECASE)


class BadImage(Exception):
    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class InputImage:
    """One checked input image, as the PNG the worker reads."""

    png: bytes
    width: int
    height: int
    sha256: str


@dataclass(frozen=True)
class InputImages:
    init: InputImage | None
    mask: InputImage | None
    control: InputImage | None = None

    def stored(self) -> dict[str, InputImage]:
        """Each image by the name it is stored under."""
        named = {"init": self.init, "mask": self.mask, "control": self.control}
        return {name: image for name, image in named.items() if image is not None}


def _invalid(field: str, error: BadImage) -> ServiceError:
    location = ["body", *field.split(".")]
    return ServiceError(
        ErrorType.VALIDATION_ERROR,
        f"{field}: {error}",
        [{"loc": location, "msg": str(error), "type": error.kind}],
    )


def _fetch(url: str, api: ApiSettings, webhooks: WebhookSettings) -> bytes:
    """The bytes at `url`, read from the address the SSRF guard checked, within the byte cap."""
    try:
        target = check_webhook_url(url, webhooks)
    except WebhookRefused as exc:
        raise BadImage("image_url_refused", f"the URL is refused: {exc}") from exc
    address, headers, extensions = pinned_url(target)
    limit = api.max_input_image_bytes
    try:
        with (
            httpx.Client(timeout=api.input_image_timeout_s, follow_redirects=False) as http,
            http.stream("GET", address, headers=headers, extensions=extensions) as response,
        ):
            if response.status_code != 200:
                raise BadImage(
                    "image_fetch_failed", f"fetching the image answered {response.status_code}"
                )
            body = bytearray()
            for chunk in response.iter_bytes():
                body.extend(chunk)
                if len(body) > limit:
                    raise BadImage("image_too_large", f"the image is over {limit} bytes")
            return bytes(body)
    except httpx.HTTPError as exc:
        raise BadImage("image_fetch_failed", f"could not fetch the image: {exc}") from exc


def _decode_base64(text: str, limit: int) -> bytes:
    encoded = _DATA_URL.sub("", text, count=1)
    if len(encoded) > 4 * (limit // 3 + 1):
        raise BadImage("image_too_large", f"the image is over {limit} bytes")
    try:
        data = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise BadImage("image_invalid", "not base64, a data: URL or an http(s) URL") from exc
    if len(data) > limit:
        raise BadImage("image_too_large", f"the image is over {limit} bytes")
    return data


def _open(data: bytes, mode: str, max_pixels: int) -> Image.Image:
    """The image in `mode`, refusing anything but a PNG, JPEG or WebP within `max_pixels`;
    the size is checked from the header, before any pixel is decoded."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            if image.format not in _FORMATS:
                raise BadImage("image_invalid", f"{image.format} images are not accepted")
            pixels = image.width * image.height
            if pixels > max_pixels:
                raise BadImage(
                    "image_too_many_pixels",
                    f"{image.width}x{image.height} is over the limit of {max_pixels} pixels",
                )
            image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise BadImage("image_too_many_pixels", "the image is a decompression bomb") from exc
    except UnidentifiedImageError as exc:
        raise BadImage("image_invalid", "not an image (PNG, JPEG or WebP)") from exc
    except OSError as exc:
        raise BadImage("image_invalid", f"the image could not be decoded: {exc}") from exc
    return image.convert(mode)


def _read(source: str, mode: str, api: ApiSettings, webhooks: WebhookSettings) -> InputImage:
    limit = api.max_input_image_bytes
    data = _fetch(source, api, webhooks) if _URL.match(source) else _decode_base64(source, limit)
    image = _open(data, mode, api.max_input_image_pixels)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    digest = hashlib.sha256(data).hexdigest()
    return InputImage(buffer.getvalue(), image.width, image.height, digest)


def read_input_images(
    generation: GenerationRequest, api: ApiSettings, webhooks: WebhookSettings
) -> InputImages | None:
    """The request's init, mask and control images, checked; raises a 422 ServiceError for a
    bad one."""
    if generation.control is not None:
        try:
            control = _read(generation.control.image, "RGB", api, webhooks)
        except BadImage as exc:
            raise _invalid("control.image", exc) from exc
        return InputImages(None, None, control)
    if generation.init_image is None:
        return None
    try:
        init = _read(generation.init_image, "RGB", api, webhooks)
    except BadImage as exc:
        raise _invalid("init_image", exc) from exc
    if generation.mask_image is None:
        return InputImages(init, None)
    try:
        mask = _read(generation.mask_image, "L", api, webhooks)
    except BadImage as exc:
        raise _invalid("mask_image", exc) from exc
    if (mask.width, mask.height) != (init.width, init.height):
        raise _invalid(
            "mask_image",
            BadImage(
                "mask_size_mismatch",
                f"the mask is {mask.width}x{mask.height}, the init image "
                f"{init.width}x{init.height}; they must be the same size",
            ),
        )
    return InputImages(init, mask)
