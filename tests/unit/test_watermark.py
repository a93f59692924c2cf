"""The watermark survives the service's encodings, recompression, a half-size resize and crops."""

import io
from collections.abc import Callable

import numpy as np
import pytest
from PIL import Image

from shared import watermark
from tests.support import REPO_ROOT

PAYLOAD = 0xA5C3_0F1E_7B29


def _encoded(image: Image.Image, fmt: str, **options: int) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def _crop(image: Image.Image, left: int, top: int, right: int, bottom: int) -> Image.Image:
    return image.crop((left, top, image.width - right, image.height - bottom))


TRANSFORMS: dict[str, Callable[[Image.Image], Image.Image]] = {
    "png": lambda im: _encoded(im, "PNG"),
    "jpeg92": lambda im: _encoded(im, "JPEG", quality=92),
    "webp92": lambda im: _encoded(im, "WEBP", quality=92),
    "jpeg90": lambda im: _encoded(im, "JPEG", quality=90),
    "jpeg75": lambda im: _encoded(im, "JPEG", quality=75),
    "jpeg50": lambda im: _encoded(im, "JPEG", quality=50),
    "half_lanczos": lambda im: im.resize((im.width // 2, im.height // 2), Image.Resampling.LANCZOS),
    "half_bicubic": lambda im: im.resize((im.width // 2, im.height // 2), Image.Resampling.BICUBIC),
    "crop_5pct_each_side": lambda im: _crop(im, 25, 25, 26, 26),
    "crop_10pct_corner": lambda im: _crop(im, 51, 51, 0, 0),
    "crop_10pct_odd_offset": lambda im: _crop(im, 7, 3, 44, 48),
    "webp80_from_png": lambda im: _encoded(_encoded(im, "PNG"), "WEBP"),
}


def smooth_image(seed: int, size: int = 512) -> Image.Image:
    """Like the tiny model's output: low-pass-filtered colour noise, upscaled, a little grain."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (size // 32, size // 32, 3), dtype=np.uint8)
    upscaled = np.asarray(Image.fromarray(small).resize((size, size), Image.Resampling.BICUBIC))
    grain = rng.normal(0.0, 6.0, upscaled.shape)
    return Image.fromarray(np.clip(upscaled + grain, 0, 255).astype(np.uint8))


def photo(offset: int = 0) -> Image.Image:
    image = Image.open(REPO_ROOT / "examples" / "photo.png").convert("RGB")
    return image.resize((560, 560), Image.Resampling.LANCZOS).crop(
        (offset, offset, offset + 512, offset + 512)
    )


def psnr(a: Image.Image, b: Image.Image) -> float:
    error = np.asarray(a, np.float64) - np.asarray(b, np.float64)
    return float(10 * np.log10(255.0**2 / np.mean(error**2)))


@pytest.fixture(scope="module")
def originals() -> dict[str, Image.Image]:
    return {"photo": photo(), "smooth": smooth_image(7)}


@pytest.fixture(scope="module")
def marked(originals: dict[str, Image.Image]) -> dict[str, Image.Image]:
    return {name: watermark.embed(image, PAYLOAD) for name, image in originals.items()}


@pytest.mark.parametrize("transform", list(TRANSFORMS))
@pytest.mark.parametrize("name", ["photo", "smooth"])
def test_payload_survives(marked: dict[str, Image.Image], name: str, transform: str) -> None:
    found = watermark.decode(TRANSFORMS[transform](marked[name]))
    assert found is not None
    assert found.payload == PAYLOAD
    assert 0.0 < found.confidence <= 1.0


@pytest.mark.parametrize("name", ["photo", "smooth"])
def test_bit_accuracy_after_jpeg75(marked: dict[str, Image.Image], name: str) -> None:
    assert watermark.bit_accuracy(TRANSFORMS["jpeg75"](marked[name]), PAYLOAD) >= 0.95


def test_change_is_small(originals: dict[str, Image.Image], marked: dict[str, Image.Image]) -> None:
    # Measured: photo 45.9 dB, smooth images 41.8-42.0 dB.
    for name, image in originals.items():
        assert marked[name].size == image.size
        assert marked[name].mode == "RGB"
        assert psnr(image, marked[name]) >= 40.0


def test_flat_image_changes_little_and_still_decodes() -> None:
    flat = Image.new("RGB", (512, 512), (128, 128, 128))
    marked = watermark.embed(flat, PAYLOAD)
    change = np.abs(np.asarray(marked, np.int16) - 128)
    assert change.max() <= 4
    assert psnr(flat, marked) >= 45.0
    found = watermark.decode(_encoded(marked, "JPEG", quality=75))
    assert found is not None and found.payload == PAYLOAD


def test_unmarked_images_decode_to_none(originals: dict[str, Image.Image]) -> None:
    rng = np.random.default_rng(3)
    images = [
        *originals.values(),
        photo(offset=31),
        Image.new("RGB", (512, 512), (200, 30, 90)),
        Image.new("RGB", (512, 512), (255, 255, 255)),
        Image.fromarray(rng.integers(0, 256, (512, 512, 3), dtype=np.uint8)),
        *(smooth_image(100 + n, size) for n, size in enumerate((256, 384, 512, 768))),
    ]
    for image in images:
        assert watermark.decode(image) is None
        assert watermark.decode(TRANSFORMS["jpeg75"](image)) is None


def test_two_payloads_never_confuse() -> None:
    other = PAYLOAD ^ 0x0000_0000_0001
    for seed in range(3):
        image = smooth_image(200 + seed)
        for payload in (PAYLOAD, other):
            found = watermark.decode(TRANSFORMS["jpeg75"](watermark.embed(image, payload)))
            assert found is not None and found.payload == payload


@pytest.mark.parametrize("size", [(256, 256), (768, 512), (520, 1024)])
def test_other_sizes(size: tuple[int, int]) -> None:
    image = smooth_image(300).resize(size, Image.Resampling.BICUBIC)
    marked = watermark.embed(image, PAYLOAD)
    assert marked.size == size
    found = watermark.decode(TRANSFORMS["jpeg75"](marked))
    assert found is not None and found.payload == PAYLOAD


def test_payload_range_and_tiny_images() -> None:
    image = smooth_image(1, 256)
    for payload in (-1, 1 << watermark.PAYLOAD_BITS):
        with pytest.raises(ValueError):
            watermark.embed(image, payload)
    for payload in (0, (1 << watermark.PAYLOAD_BITS) - 1):
        found = watermark.decode(watermark.embed(image, payload))
        assert found is not None and found.payload == payload
    tiny = smooth_image(2, 96)
    assert np.array_equal(np.asarray(watermark.embed(tiny, PAYLOAD)), np.asarray(tiny))
    assert watermark.decode(tiny) is None
