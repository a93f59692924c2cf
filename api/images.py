"""A request's input images (image-to-image, inpainting, ControlNet): read from base64 or fetched
from a URL through the webhooks' SSRF guard, checked with Pillow and stored as PNG before the job
is queued. Every way an image can be wrong is a 422 here, never a failed job later."""

import asyncio
import base64
import binascii
import hashlib
import io
import re
import warnings
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import lru_cache

import httpx
from PIL import Image, UnidentifiedImageError
from starlette.concurrency import run_in_threadpool

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


class ImageFetches:
    """The input image URL fetches of one API process: at most `T2I_INPUT_IMAGE_FETCHES` at once
    and `T2I_INPUT_IMAGE_FETCHES_PER_KEY` requests of one key, so one slow client cannot hold
    every fetch this process may make."""

    def __init__(self, at_once: int, per_key: int) -> None:
        self._slots = asyncio.Semaphore(at_once)
        self._per_key = per_key
        self._in_flight: Counter[str] = Counter()

    @asynccontextmanager
    async def for_key(self, key_id: str) -> AsyncIterator[None]:
        """Room for one request of `key_id` to fetch its images; 429 when the key has none."""
        if self._in_flight[key_id] >= self._per_key:
            raise ServiceError(
                ErrorType.RATE_LIMITED,
                f"this key already has {self._per_key} requests fetching input image URLs; "
                "retry when one is done, or send the images as base64",
                headers={"Retry-After": "1"},
            )
        self._in_flight[key_id] += 1
        try:
            yield
        finally:
            self._in_flight[key_id] -= 1
            if not self._in_flight[key_id]:
                del self._in_flight[key_id]

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        async with self._slots:
            yield


@lru_cache
def image_fetches(at_once: int, per_key: int) -> ImageFetches:
    """This process's fetch limits (one per pair of settings)."""
    return ImageFetches(at_once, per_key)


async def _fetch(
    url: str, api: ApiSettings, webhooks: WebhookSettings, fetches: ImageFetches
) -> bytes:
    """The bytes at `url`, read from the address the SSRF guard checked, within the byte cap and
    one deadline for all of it; on the event loop, so a slow server holds no thread."""
    deadline = api.input_image_timeout_s
    try:
        async with asyncio.timeout(deadline):
            async with fetches.slot():
                return await _fetch_checked(url, api, webhooks)
    except TimeoutError as exc:
        raise BadImage(
            "image_fetch_timeout",
            f"fetching the image took longer than {deadline:g} s (T2I_INPUT_IMAGE_TIMEOUT_S)",
        ) from exc


async def _fetch_checked(url: str, api: ApiSettings, webhooks: WebhookSettings) -> bytes:
    try:
        # It resolves the host name, which only a thread can do without blocking the loop.
        target = await asyncio.to_thread(check_webhook_url, url, webhooks)
    except WebhookRefused as exc:
        raise BadImage("image_url_refused", f"the URL is refused: {exc}") from exc
    address, headers, extensions = pinned_url(target)
    limit = api.max_input_image_bytes
    try:
        async with (
            httpx.AsyncClient(timeout=api.input_image_timeout_s, follow_redirects=False) as http,
            http.stream("GET", address, headers=headers, extensions=extensions) as response,
        ):
            if response.status_code != 200:
                raise BadImage(
                    "image_fetch_failed", f"fetching the image answered {response.status_code}"
                )
            body = bytearray()
            async for chunk in response.aiter_bytes():
                body.extend(chunk)
                _check_size(len(body), limit)
            return bytes(body)
    except httpx.TimeoutException as exc:
        raise TimeoutError from exc
    except httpx.HTTPError as exc:
        raise BadImage("image_fetch_failed", f"could not fetch the image: {exc}") from exc


def _too_large(limit: int) -> BadImage:
    return BadImage("image_too_large", f"the image is over {limit} bytes")


def _check_size(size: int, limit: int) -> None:
    """Refuse an image of `size` bytes over the byte cap `limit`."""
    if size > limit:
        raise _too_large(limit)


def _decode_base64(text: str, limit: int) -> bytes:
    encoded = _DATA_URL.sub("", text, count=1)
    # Refused before decoding: base64 of `limit` bytes is at most this long.
    if len(encoded) > 4 * (limit // 3 + 1):
        raise _too_large(limit)
    try:
        data = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise BadImage("image_invalid", "not base64, a data: URL or an http(s) URL") from exc
    _check_size(len(data), limit)
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


def _checked(data: bytes, mode: str, api: ApiSettings) -> InputImage:
    image = _open(data, mode, api.max_input_image_pixels)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    digest = hashlib.sha256(data).hexdigest()
    return InputImage(buffer.getvalue(), image.width, image.height, digest)


def _decoded(source: str, mode: str, api: ApiSettings) -> InputImage:
    return _checked(_decode_base64(source, api.max_input_image_bytes), mode, api)


async def _read(
    field: str,
    source: str,
    mode: str,
    api: ApiSettings,
    webhooks: WebhookSettings,
    fetches: ImageFetches,
) -> InputImage:
    """One image, checked; decoding is CPU work, so it runs in the thread pool."""
    try:
        if _URL.match(source):
            data = await _fetch(source, api, webhooks, fetches)
            return await run_in_threadpool(_checked, data, mode, api)
        return await run_in_threadpool(_decoded, source, mode, api)
    except BadImage as exc:
        raise _invalid(field, exc) from exc


def _fetches_any_url(generation: GenerationRequest) -> bool:
    sources = [generation.init_image, generation.mask_image]
    if generation.control is not None:
        sources.append(generation.control.image)
    return any(source is not None and _URL.match(source) for source in sources)


async def read_input_images(
    generation: GenerationRequest, api: ApiSettings, webhooks: WebhookSettings, key_id: str
) -> InputImages | None:
    """The request's init, mask and control images, checked; raises a 422 ServiceError for a
    bad one, and a 429 when `key_id` already has its share of URL fetches under way."""
    fetches = image_fetches(api.input_image_fetches, api.input_image_fetches_per_key)
    if not _fetches_any_url(generation):
        return await _read_all(generation, api, webhooks, fetches)
    async with fetches.for_key(key_id):
        return await _read_all(generation, api, webhooks, fetches)


async def _read_all(
    generation: GenerationRequest,
    api: ApiSettings,
    webhooks: WebhookSettings,
    fetches: ImageFetches,
) -> InputImages | None:
    if generation.control is not None:
        source = generation.control.image
        control = await _read("control.image", source, "RGB", api, webhooks, fetches)
        return InputImages(None, None, control)
    if generation.init_image is None:
        return None
    init = await _read("init_image", generation.init_image, "RGB", api, webhooks, fetches)
    if generation.mask_image is None:
        return InputImages(init, None)
    mask = await _read("mask_image", generation.mask_image, "L", api, webhooks, fetches)
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


def decode_upload(source: str, api: ApiSettings) -> bytes:
    """An uploaded image's bytes from base64 or a data: URL, within `T2I_MAX_INPUT_IMAGE_BYTES`."""
    try:
        return _decode_base64(source, api.max_input_image_bytes)
    except BadImage as exc:
        raise _invalid("image", exc) from exc


def open_upload(data: bytes, api: ApiSettings) -> Image.Image:
    """An uploaded image in RGB, refused like an input image: PNG, JPEG or WebP only, within the
    byte cap and, from its header before any pixel is decoded, the pixel cap."""
    try:
        _check_size(len(data), api.max_input_image_bytes)
        return _open(data, "RGB", api.max_input_image_pixels)
    except BadImage as exc:
        raise _invalid("image", exc) from exc


def upload_as_base64(part: str, data: bytes, api: ApiSettings) -> str:
    """A multipart file part as the base64 a JSON request would carry, refused at once when it is
    over `T2I_MAX_INPUT_IMAGE_BYTES`; the rest of an input image's checks (the pixel cap from the
    header, the decompression bomb, PNG/JPEG/WebP only) follow on the JSON request's way."""
    try:
        _check_size(len(data), api.max_input_image_bytes)
    except BadImage as exc:
        raise _invalid(part, exc) from exc
    return base64.b64encode(data).decode()
