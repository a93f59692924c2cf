"""OpenAI's Images API as the official `openai` package calls it, against a real API and worker."""

import base64
import io
from collections.abc import Iterator

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from tests.support import REPO_ROOT, Stack, wait_for_job

SD_SETTINGS = {"num_inference_steps": 3, "guidance_scale": 6.0, "scheduler": "euler_a"}
PHOTO = REPO_ROOT / "examples" / "photo.png"
# White over the area to repaint, black elsewhere, no alpha: our own masks' convention.
MASK = REPO_ROOT / "examples" / "mask.png"


def decoded(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data))


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


@pytest.fixture
def client(local_stack: Stack) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(
        base_url=f"{local_stack.base_url}/v1", api_key=local_stack.api_key, max_retries=0
    ) as client:
        yield client


def test_b64_json_images_are_the_ones_the_job_api_renders(local_stack: Stack) -> None:
    # Each job's watermark is its own: the pixels compared are the render's, unmarked.
    unmarked = local_stack.create_key("no watermark", 100_000, watermark_exempt=True)
    client = openai.OpenAI(base_url=f"{local_stack.base_url}/v1", api_key=unmarked, max_retries=0)
    result = client.images.generate(
        prompt="a lighthouse at dusk",
        n=2,
        size="256x320",
        response_format="b64_json",
        user="end-user-42",
        model="dall-e-2",
        extra_body={**SD_SETTINGS, "seed": 7, "negative_prompt": "fog"},
    )
    assert (result.size, result.output_format, len(result.data or [])) == ("256x320", "png", 2)
    images = [decoded(base64.b64decode(image.b64_json or "")) for image in result.data or []]
    assert all((image.format, image.size) == ("PNG", (256, 320)) for image in images)
    texts = [image.info["parameters"] for image in images]
    assert texts[0].startswith("a lighthouse at dusk\nNegative prompt: fog\n")
    assert ["Seed: 7" in texts[0], "Seed: 8" in texts[1]] == [True, True]
    assert "Steps: 3, Sampler: Euler a, CFG scale: 6.0" in texts[0]

    # The same job path: the job is this key's, and /v1/jobs renders the same images (within
    # the rounding that batching may change, as in the batching tests).
    client.close()
    with local_stack.client(unmarked) as http:
        [listed] = http.get("/v1/jobs", params={"limit": 1}).json()["data"]
        assert listed["request"]["prompt"] == "a lighthouse at dusk"
        assert listed["status"] == "succeeded" and len(listed["images"]) == 2
        body = {"prompt": "a lighthouse at dusk", "negative_prompt": "fog", "seed": 7}
        size = {"width": 256, "height": 320, "num_images": 2}
        job = http.post("/v1/jobs", json={**body, **SD_SETTINGS, **size})
        again = wait_for_job(http, job.json()["id"])
    for image, rendered in zip(images, again["images"], strict=True):
        direct = decoded(httpx.get(rendered["url"], timeout=10).content)
        assert np.abs(pixels(direct) - pixels(image)).max() <= 2


def test_url_answers_link_to_the_images(client: openai.OpenAI) -> None:
    result = client.images.generate(
        prompt="a red kite",
        size="256x256",
        output_format="webp",
        extra_body={"num_inference_steps": 2},
    )
    [image] = result.data or []
    assert image.b64_json is None and image.url
    downloaded = httpx.get(image.url, timeout=10)
    assert downloaded.headers["content-type"] == "image/webp"
    assert (decoded(downloaded.content).format, result.output_format) == ("WEBP", "webp")


def test_a_bad_request_raises_bad_request_error_naming_the_field(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as malformed_size:
        client.images.generate(prompt="a cat", size="big")
    error = malformed_size.value
    assert error.status_code == 400
    assert (error.type, error.param, error.code) == (
        "invalid_request_error",
        "size",
        "validation_error",
    )
    # A human message, not the pattern the schema declares.
    assert "'big' is not a size: send `auto` or WIDTHxHEIGHT" in error.message
    assert not any(sign in error.message for sign in ("^", "[0-9]", "$"))

    with pytest.raises(openai.BadRequestError) as unknown_field:
        client.images.generate(prompt="a cat", extra_body={"num_inference_stepz": 3})
    assert unknown_field.value.param == "num_inference_stepz"
    with pytest.raises(openai.BadRequestError) as too_many:
        client.images.generate(prompt="a cat", n=9)
    assert too_many.value.param == "n"


def test_a_bad_key_raises_authentication_error(local_stack: Stack) -> None:
    with (
        openai.OpenAI(
            base_url=f"{local_stack.base_url}/v1", api_key="t2i_wrong.key", max_retries=0
        ) as stranger,
        pytest.raises(openai.AuthenticationError) as raised,
    ):
        stranger.images.generate(prompt="a cat")
    assert raised.value.status_code == 401 and raised.value.code == "invalid_api_key"


def test_the_keys_rate_limit_applies(local_stack: Stack) -> None:
    key = local_stack.create_key("one a minute", rate_limit_per_min=1)
    with openai.OpenAI(
        base_url=f"{local_stack.base_url}/v1", api_key=key, max_retries=0
    ) as limited:
        first = limited.images.generate(
            prompt="a cat", size="256x256", extra_body={"num_inference_steps": 1}
        )
        assert first.data
        with pytest.raises(openai.RateLimitError) as raised:
            limited.images.generate(prompt="a cat", size="256x256")
    assert raised.value.code == "rate_limit_exceeded"
    assert int(raised.value.response.headers["retry-after"]) >= 1


def test_a_job_no_worker_starts_ends_in_a_server_error(workerless_api: Stack) -> None:
    with (
        openai.OpenAI(
            base_url=f"{workerless_api.base_url}/v1", api_key=workerless_api.api_key, max_retries=0
        ) as client,
        pytest.raises(openai.InternalServerError) as raised,
    ):
        client.images.generate(prompt="nobody renders this", size="256x256")
    assert raised.value.status_code == 503 and raised.value.code == "unavailable"
    with workerless_api.client() as http:
        [job] = http.get("/v1/jobs", params={"limit": 1}).json()["data"]
    assert (job["request"]["prompt"], job["status"]) == ("nobody renders this", "expired")


def test_a_job_not_done_in_time_is_canceled_and_answered_504(serial_stack: Stack) -> None:
    with serial_stack.client() as http:
        # The one worker thread is busy with this for far longer than the route waits.
        long_render = {"width": 768, "height": 768, "num_inference_steps": 150}
        blocker = http.post("/v1/jobs", json={"prompt": "a long render", **long_render}).json()
        try:
            with (
                openai.OpenAI(
                    base_url=f"{serial_stack.base_url}/v1",
                    api_key=serial_stack.api_key,
                    max_retries=0,
                ) as client,
                pytest.raises(openai.InternalServerError) as raised,
            ):
                client.images.generate(prompt="behind a long render", size="256x256")
            [job] = http.get("/v1/jobs", params={"limit": 1}).json()["data"]
        finally:
            http.post(f"/v1/jobs/{blocker['id']}/cancel")
    assert raised.value.status_code == 504 and raised.value.code == "timeout"
    assert (job["request"]["prompt"], job["status"]) == ("behind a long render", "canceled")


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def repainted_area() -> np.ndarray:
    return np.asarray(Image.open(MASK).convert("L")) >= 128


def openai_mask() -> bytes:
    """OpenAI's convention: fully transparent where to edit, opaque elsewhere."""
    alpha = np.where(repainted_area(), 0, 255).astype(np.uint8)
    rgba = Image.new("RGBA", Image.open(PHOTO).size, (0, 0, 0, 255))
    rgba.putalpha(Image.fromarray(alpha))
    return png(rgba)


@pytest.fixture
def unmarked(local_stack: Stack) -> Iterator[openai.OpenAI]:
    """A client whose key's images carry no watermark: their pixels compare exactly."""
    key = local_stack.create_key("no watermark", 100_000, watermark_exempt=True)
    with openai.OpenAI(base_url=f"{local_stack.base_url}/v1", api_key=key, max_retries=0) as client:
        yield client


def assert_edited(result: openai.types.ImagesResponse) -> None:
    assert result.size == "512x512"
    [image] = result.data or []
    edited = pixels(decoded(base64.b64decode(image.b64_json or "")))
    difference = np.abs(edited - pixels(Image.open(PHOTO))).max(axis=2)
    repaint = repainted_area()
    # Lossless PNG, no resizing, no watermark: the kept area is the photo itself.
    assert difference[~repaint].max() == 0
    assert difference[repaint].mean() > 0.1 * 255


def test_an_edit_repaints_where_the_mask_is_transparent_and_keeps_the_rest(
    unmarked: openai.OpenAI,
) -> None:
    result = unmarked.images.edit(
        image=("photo.png", PHOTO.read_bytes(), "image/png"),
        mask=("mask.png", openai_mask(), "image/png"),
        prompt="a red balloon",
        response_format="b64_json",
        model="dall-e-2",
    )
    assert_edited(result)


def test_an_edit_without_a_mask_repaints_the_images_transparent_pixels(
    unmarked: openai.OpenAI,
) -> None:
    photo = Image.open(PHOTO).convert("RGBA")
    photo.putalpha(Image.open(io.BytesIO(openai_mask())).getchannel("A"))
    result = unmarked.images.edit(
        image=[("photo.png", png(photo), "image/png")],
        prompt="a red balloon",
        response_format="b64_json",
    )
    assert_edited(result)


def test_an_edit_needs_a_mask_or_transparent_pixels(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as no_mask:
        client.images.edit(image=PHOTO.read_bytes(), prompt="a red balloon")
    assert no_mask.value.param == "mask"
    assert "send a mask" in no_mask.value.message
    with pytest.raises(openai.BadRequestError) as opaque_mask:
        client.images.edit(image=PHOTO.read_bytes(), mask=MASK.read_bytes(), prompt="a balloon")
    assert opaque_mask.value.param == "mask"
    assert "no alpha channel" in opaque_mask.value.message
    with pytest.raises(openai.BadRequestError) as not_an_image:
        client.images.edit(image=b"not an image", mask=openai_mask(), prompt="a balloon")
    assert not_an_image.value.param == "image"
    small_mask = png(Image.open(io.BytesIO(openai_mask())).resize((256, 256)))
    with pytest.raises(openai.BadRequestError) as other_size:
        client.images.edit(image=PHOTO.read_bytes(), mask=small_mask, prompt="a balloon")
    assert other_size.value.param == "mask"
    assert "the mask is 256x256, the image 512x512" in other_size.value.message


def test_an_upload_route_sent_json_answers_in_openais_error_shape(local_stack: Stack) -> None:
    with local_stack.client() as http:
        answer = http.post("/v1/images/variations", json={"image": "aGVsbG8="})
    assert answer.status_code == 400
    error = answer.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert "multipart/form-data" in error["message"]


def test_variations_are_images_of_the_size_asked_for(client: openai.OpenAI) -> None:
    result = client.images.create_variation(
        image=("photo.png", PHOTO.read_bytes(), "image/png"),
        n=2,
        size="256x256",
        response_format="b64_json",
        model="dall-e-2",
    )
    assert (result.size, len(result.data or [])) == ("256x256", 2)
    images = [decoded(base64.b64decode(image.b64_json or "")) for image in result.data or []]
    assert [image.size for image in images] == [(256, 256)] * 2
    assert "Denoising strength: 0.6" in images[0].info["parameters"]

    # Without a size, the image's own; Stable Diffusion's settings as extra multipart fields.
    [url] = (
        client.images.create_variation(
            image=PHOTO.read_bytes(), extra_body={"strength": 0.5, "seed": 3}
        ).data
        or []
    )
    image = decoded(httpx.get(url.url or "", timeout=10).content)
    assert image.size == (512, 512)
    assert "Seed: 3" in image.info["parameters"]
    assert "Denoising strength: 0.5" in image.info["parameters"]


def test_an_upload_past_the_plain_body_cap_is_taken_as_an_input_image(
    client: openai.OpenAI,
) -> None:
    noise = np.random.default_rng(7).integers(0, 256, (512, 512, 3), dtype=np.uint8)
    upload = png(Image.fromarray(noise))
    # Several times T2I_MAX_BODY_BYTES (64 KiB): the input image allowance applies here too.
    assert len(upload) > 4 * 64 * 1024
    result = client.images.create_variation(
        image=("noise.png", upload, "image/png"), size="256x256", response_format="b64_json"
    )
    assert result.size == "256x256" and len(result.data or []) == 1


def test_a_size_the_workers_cannot_render_is_mapped_to_the_nearest_one(
    client: openai.OpenAI,
) -> None:
    result = client.images.generate(
        prompt="a wide harbour",
        size="1536x1024",
        response_format="b64_json",
        extra_body={"num_inference_steps": 1},
    )
    assert result.size == "1024x680"
    [image] = result.data or []
    assert decoded(base64.b64decode(image.b64_json or "")).size == (1024, 680)


def test_model_selects_a_served_model_and_openais_names_the_default(
    local_stack: Stack, client: openai.OpenAI
) -> None:
    with local_stack.client() as http:
        models = http.get("/v1/models").json()["data"]
    [served] = [model["id"] for model in models if model["workers"]]
    for name in (served, "gpt-image-1"):
        result = client.images.generate(
            prompt="a kite", size="256x256", model=name, extra_body={"num_inference_steps": 1}
        )
        assert result.data
        with local_stack.client() as http:
            [job] = http.get("/v1/jobs", params={"limit": 1}).json()["data"]
        assert job["request"]["model"] == served
