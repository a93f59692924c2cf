"""Image-to-image and inpainting through HTTP and S3, and every way an input image is refused.

The tiny model's VAE passes an image through as 8x8 block averages, so distances to the input
image mean something: with a low strength the result stays near it, with strength 1 it does not.
"""

import base64
import io
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
from PIL import Image
from redis import Redis

from tests.support import ImageServer, Stack, wait_for_job
from worker.encoding import read_parameters

SIZE = 256
STEPS = 10
# Mean absolute difference to the init image, in [0, 1]: measured on the tiny model at about
# 0.08 for strength 0.1 (one denoising step) and 0.48 for strength 1.
NEAR = 0.2
FAR = 0.3


def smooth_image(seed: int, size: int = SIZE) -> Image.Image:
    """A smooth random picture: what the tiny VAE's 8x8 blocks can carry."""
    coarse = np.random.default_rng(seed).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    return Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC)


def encoded(image: Image.Image, image_format: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=image_format)
    return buffer.getvalue()


def as_base64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def square_mask(size: int = SIZE) -> Image.Image:
    """White (repaint) in the middle quarter, black (keep) elsewhere."""
    mask = np.zeros((size, size), dtype=np.uint8)
    mask[size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = 255
    return Image.fromarray(mask)


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.int16)


def distance(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).mean() / 255)


def render(client: httpx.Client, **fields: object) -> tuple[dict, list[bytes]]:
    body = {"prompt": "a harbour", "width": SIZE, "height": SIZE, "num_inference_steps": STEPS}
    response = client.post("/v1/jobs", json={**body, **fields})
    assert response.status_code == 202, response.text
    job = wait_for_job(client, response.json()["id"], timeout_s=180)
    assert job["status"] == "succeeded", job
    files = [
        httpx.get(image["url"], timeout=10).raise_for_status().content for image in job["images"]
    ]
    return job, files


@pytest.fixture(scope="module")
def unmarked_key(s3_stack: Stack) -> str:
    """A key exempt from the watermark: these tests measure the render against its input, or
    two jobs' renders against each other, to the pixel."""
    return s3_stack.create_key("no watermark", 100_000, watermark_exempt=True)


def test_image_to_image_stays_near_its_input_at_low_strength_and_not_at_full(
    s3_stack: Stack, unmarked_key: str
) -> None:
    init = smooth_image(1)
    original = np.asarray(init, dtype=np.int16)
    with s3_stack.client(unmarked_key) as client:
        low, [low_file] = render(client, init_image=as_base64(encoded(init)), strength=0.1, seed=5)
        _, [full_file] = render(client, init_image=as_base64(encoded(init)), strength=1.0, seed=5)
    near, far = distance(pixels(low_file), original), distance(pixels(full_file), original)
    assert near < NEAR < FAR < far, (near, far)
    assert low["request"]["init_image"].startswith("sha256:")
    assert low["request"]["strength"] == 0.1
    parameters = read_parameters(low_file)
    assert parameters is not None and "Denoising strength: 0.1, Mode: img2img" in parameters


def test_inpainting_keeps_the_unmasked_area_and_repaints_the_masked_one(
    s3_stack: Stack, unmarked_key: str
) -> None:
    init, mask = smooth_image(2), square_mask()
    with s3_stack.client(unmarked_key) as client:
        job, [file] = render(
            client,
            init_image=as_base64(encoded(init)),
            mask_image="data:image/png;base64," + as_base64(encoded(mask)),
            strength=1.0,
            seed=6,
        )
    difference = np.abs(pixels(file) - np.asarray(init, dtype=np.int16)).max(axis=2)
    repaint = np.asarray(mask) >= 128
    # PNG is lossless and the input needed no resizing: the kept area is the input exactly.
    assert difference[~repaint].max() == 0
    assert difference[repaint].mean() > 0.1 * 255
    assert job["request"]["mask_image"].startswith("sha256:")


def test_an_init_image_of_another_size_is_resized_to_the_requested_one(s3_stack: Stack) -> None:
    with s3_stack.client() as client:
        job, [file] = render(
            client, init_image=as_base64(encoded(smooth_image(3, 320), "JPEG")), strength=0.5
        )
    assert Image.open(io.BytesIO(file)).size == (SIZE, SIZE)
    assert (job["images"][0]["width"], job["images"][0]["height"]) == (SIZE, SIZE)


def test_image_jobs_batch_like_text_jobs_and_each_image_is_the_one_it_gets_alone(
    s3_stack: Stack, unmarked_key: str
) -> None:
    init = as_base64(encoded(smooth_image(4)))
    with s3_stack.client(unmarked_key) as client:
        _, pair = render(client, init_image=init, strength=0.6, seed=20, num_images=2)
        _, [second_alone] = render(client, init_image=init, strength=0.6, seed=21)
    assert np.abs(pixels(pair[1]) - pixels(second_alone)).max() <= 2
    assert np.abs(pixels(pair[0]) - pixels(pair[1])).max() > 0


@pytest.fixture(scope="module")
def image_server() -> Iterator[ImageServer]:
    server = ImageServer(encoded(smooth_image(7)))
    yield server
    server.close()


def test_an_init_image_url_is_fetched_when_the_ssrf_guard_allows_its_host(
    webhook_stack: Stack, image_server: ImageServer
) -> None:
    # The webhook stack allow-lists 127.0.0.1 for the SSRF guard, as an operator would.
    url = image_server.url
    with webhook_stack.client() as client:
        job, [file] = render(client, init_image=url, strength=0.1)
    original = np.asarray(smooth_image(7), dtype=np.int16)
    assert distance(pixels(file), original) < NEAR
    assert job["request"]["init_image"].startswith("sha256:")


def _job_keys(redis: Redis) -> set[bytes]:
    return set(redis.scan_iter("t2i:job:*"))


def _bomb() -> bytes:
    """A PNG of 6000 x 6000 pixels in a few KB: refused from its header, never decoded."""
    return encoded(Image.new("1", (6000, 6000)))


def _truncated() -> bytes:
    data = encoded(smooth_image(8))
    return data[: len(data) // 2]


def _bad_cases() -> list[tuple[str, dict, str, str]]:
    good = as_base64(encoded(smooth_image(9)))
    return [
        ("not base64", {"init_image": "%%% not base64 %%%"}, "init_image", "image_invalid"),
        (
            "not an image",
            {"init_image": as_base64(b"hello, world" * 10)},
            "init_image",
            "image_invalid",
        ),
        (
            "a GIF",
            {"init_image": as_base64(encoded(smooth_image(9), "GIF"))},
            "init_image",
            "image_invalid",
        ),
        ("cut short", {"init_image": as_base64(_truncated())}, "init_image", "image_invalid"),
        (
            "too many pixels",
            {"init_image": as_base64(_bomb())},
            "init_image",
            "image_too_many_pixels",
        ),
        (
            "too many bytes",
            {"init_image": as_base64(b"\x89PNG" + b"\0" * (8 * 1024 * 1024 + 1))},
            "init_image",
            "image_too_large",
        ),
        (
            "mask of another size",
            {"init_image": good, "mask_image": as_base64(encoded(square_mask(128)))},
            "mask_image",
            "mask_size_mismatch",
        ),
        (
            "mask not an image",
            {"init_image": good, "mask_image": "bWFzaw=="},
            "mask_image",
            "image_invalid",
        ),
        ("mask without image", {"mask_image": good}, "body", "value_error"),
        ("strength without image", {"strength": 0.5}, "body", "value_error"),
        ("strength too low", {"init_image": good, "strength": 0.05}, "body", "value_error"),
        ("strength above 1", {"init_image": good, "strength": 1.5}, "strength", "less_than_equal"),
        (
            "URL to a private address",
            {"init_image": "http://10.1.2.3/cat.png"},
            "init_image",
            "image_url_refused",
        ),
        (
            "URL to loopback",
            {"init_image": "http://127.0.0.1:9/cat.png"},
            "init_image",
            "image_url_refused",
        ),
    ]


@pytest.mark.parametrize(
    ("case", "fields", "field", "kind"), _bad_cases(), ids=[case[0] for case in _bad_cases()]
)
def test_a_bad_input_image_gets_422_and_nothing_is_queued_or_stored(
    workerless_api: Stack, case: str, fields: dict, field: str, kind: str
) -> None:
    redis = Redis.from_url(workerless_api.env["T2I_REDIS_URL"])
    stored = workerless_api.workdir / "data" / "images"
    before = (_job_keys(redis), redis.llen("txt2img"), sorted(stored.rglob("*")))
    body = {"prompt": "a cat", "width": SIZE, "height": SIZE, "num_inference_steps": STEPS}
    with workerless_api.client() as client:
        response = client.post("/v1/jobs", json={**body, **fields})
    assert response.status_code == 422, (case, response.text)
    error = response.json()["error"]
    assert error["type"] == "validation_error"
    assert any(
        detail["loc"][-1] == field and detail["type"] == kind for detail in error["details"]
    ), error
    assert (_job_keys(redis), redis.llen("txt2img"), sorted(stored.rglob("*"))) == before
