"""The walking skeleton through HTTP, as a client sees it: submit, poll, download."""

import io

import httpx
import numpy as np
import pytest
from PIL import Image
from redis import Redis

from shared.settings import StorageSettings
from shared.storage import job_prefix, make_storage
from tests.conftest import FAIL_PROMPT
from tests.support import Stack, wait_for_job
from worker.encoding import read_parameters

SMALL = {"width": 256, "height": 256, "num_inference_steps": 4}


def submit(client: httpx.Client, **fields: object) -> dict:
    response = client.post("/v1/jobs", json={**SMALL, **fields})
    assert response.status_code == 202, response.text
    job = response.json()
    assert response.headers["location"] == f"/v1/jobs/{job['id']}"
    return job


def render(client: httpx.Client, **fields: object) -> dict:
    job = wait_for_job(client, submit(client, **fields)["id"])
    assert job["status"] == "succeeded", job
    return job


def download(url: str) -> bytes:
    response = httpx.get(url, timeout=10)
    assert response.status_code == 200, response.text
    return response.content


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.int16)


def test_submit_poll_and_download_a_png(any_stack: Stack) -> None:
    with any_stack.client() as client:
        queued = submit(client, prompt="a lighthouse at dusk", width=320, height=256, seed=1234)
        # Whether a worker admitted it before the answer was written is a race this test
        # does not look at.
        assert queued["request"]["seed"] == 1234
        job = wait_for_job(client, queued["id"])

    assert job["status"] == "succeeded", job
    assert job["started_at"] and job["finished_at"] and job["error"] is None
    assert job["timings"]["render_s"] > 0 and job["timings"]["upload_s"] >= 0
    [image] = job["images"]
    assert (image["width"], image["height"], image["seed"]) == (320, 256, 1234)
    assert image["content_type"] == "image/png"
    data = download(image["url"])
    png = Image.open(io.BytesIO(data))
    assert (png.format, png.size) == ("PNG", (320, 256))
    parameters = png.info["parameters"]
    assert parameters.startswith("a lighthouse at dusk\n")
    assert "Seed: 1234" in parameters and "Size: 320x256" in parameters


def test_an_image_no_longer_stored_is_404_and_logs_no_traceback(
    any_stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    with any_stack.client() as client:
        job = render(client, prompt="a paper boat", seed=3)
        for name, value in any_stack.env.items():
            monkeypatch.setenv(name, value)
        settings = StorageSettings()
        assert make_storage(settings).delete_prefix(job_prefix(settings.key_prefix, job["id"]))
        assert any_stack.api is not None
        logged_before = len(any_stack.api.log_path.read_text().splitlines())
        response = client.get(f"/v1/jobs/{job['id']}/images/0")
    assert response.status_code == 404, response.text
    assert response.json()["error"]["type"] == "not_found"
    assert "no longer stored" in response.json()["error"]["message"]
    logged_since = any_stack.api.log_path.read_text().splitlines()[logged_before:]
    assert not any("Traceback" in line for line in logged_since), logged_since


def test_s3_backend_stores_the_object_under_its_job_key(s3_stack: Stack) -> None:
    with s3_stack.client() as client:
        job = render(client, prompt="a red kite", seed=7)
    url = job["images"][0]["url"]
    assert f"/{job['id']}/1/0.png" in url and "X-Amz-Signature" in url


def test_same_seed_same_pixels_and_another_seed_different(local_stack: Stack) -> None:
    # Each job's watermark is its own: the pixels compared are the render's, unmarked.
    unmarked = local_stack.create_key("no watermark", 100_000, watermark_exempt=True)
    with local_stack.client(unmarked) as client:
        first, again, other = (
            render(client, prompt="a teapot", seed=seed) for seed in (42, 42, 43)
        )
    first_pixels, again_pixels, other_pixels = (
        pixels(download(job["images"][0]["url"])) for job in (first, again, other)
    )
    assert np.array_equal(first_pixels, again_pixels)
    assert np.abs(first_pixels - other_pixels).max() > 0


def test_several_images_are_distinct_and_each_has_its_seed(local_stack: Stack) -> None:
    # Each job's watermark is its own: the pixels compared are the render's, unmarked.
    unmarked = local_stack.create_key("no watermark", 100_000, watermark_exempt=True)
    with local_stack.client(unmarked) as client:
        job = render(client, prompt="three pebbles", num_images=3, seed=100)
        alone = render(client, prompt="three pebbles", seed=101)
    assert [image["seed"] for image in job["images"]] == [100, 101, 102]
    images = [pixels(download(image["url"])) for image in job["images"]]
    for i in range(3):
        for j in range(i + 1, 3):
            assert np.abs(images[i] - images[j]).max() > 0
    for image in job["images"]:
        assert f"Seed: {image['seed']}" in read_parameters(download(image["url"]))
    # The second image is the one seed 101 gives alone (within float noise of batching).
    assert np.abs(images[1] - pixels(download(alone["images"][0]["url"]))).max() <= 2


@pytest.mark.parametrize(("output_format", "pil_format"), [("jpeg", "JPEG"), ("webp", "WEBP")])
def test_jpeg_and_webp_carry_their_parameters(
    local_stack: Stack, output_format: str, pil_format: str
) -> None:
    with local_stack.client() as client:
        job = render(client, prompt="a paper boat", seed=5, output_format=output_format)
    image = job["images"][0]
    assert image["content_type"] == f"image/{output_format}"
    data = download(image["url"])
    assert Image.open(io.BytesIO(data)).format == pil_format
    assert "Seed: 5" in read_parameters(data)


def _job_keys(redis: Redis) -> int:
    return sum(1 for _ in redis.scan_iter("t2i:job:*"))


@pytest.mark.parametrize(
    ("body", "bad_field"),
    [
        ({"prompt": "a cat", "width": 513}, "width"),
        ({"prompt": "a cat", "num_inference_steps": 0}, "num_inference_steps"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": "   \n\t"}, "prompt"),
        ({"prompt": "a cat", "style": "noir"}, "style"),
        ({"prompt": "a cat", "width": "512"}, "width"),
        ({"prompt": 12}, "prompt"),
        ({"prompt": "a cat", "guidance_scale": "high"}, "guidance_scale"),
        ({"prompt": "a cat", "scheduler": "k_heun"}, "scheduler"),
        ({"prompt": "a cat", "seed": -1}, "seed"),
        ({"prompt": "a cat", "num_images": 9}, "num_images"),
        ({"prompt": "a cat", "width": 1024, "height": 1024, "num_images": 8}, None),
        ({"width": 512}, "prompt"),
    ],
)
def test_invalid_requests_get_422_and_enqueue_nothing(
    local_stack: Stack, body: dict, bad_field: str | None
) -> None:
    redis = Redis.from_url(local_stack.env["T2I_REDIS_URL"])
    jobs_before, queued_before = _job_keys(redis), redis.llen("txt2img")
    with local_stack.client() as client:
        response = client.post("/v1/jobs", json=body)
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["type"] == "validation_error" and error["message"]
    if bad_field is not None:
        assert any(detail["loc"][-1] == bad_field for detail in error["details"]), error
    assert "Traceback" not in response.text
    assert (_job_keys(redis), redis.llen("txt2img")) == (jobs_before, queued_before)


def test_malformed_json_gets_422_envelope(local_stack: Stack) -> None:
    with local_stack.client() as client:
        response = client.post(
            "/v1/jobs", content=b"{not json", headers={"content-type": "application/json"}
        )
    assert response.status_code == 422
    assert response.json()["error"]["type"] == "validation_error"


@pytest.mark.parametrize(
    "job_id",
    [
        "0123456789abcdef0123456789abcdef:events",
        "0123456789abcdef0123456789abcdef:webhooks",
        "*",
        "0123456789ABCDEF0123456789ABCDEF",
    ],
)
def test_an_id_that_names_no_job_is_404_before_it_reaches_redis(
    local_stack: Stack, job_id: str
) -> None:
    redis = Redis.from_url(local_stack.env["T2I_REDIS_URL"])
    with local_stack.client() as client:
        real = client.post("/v1/jobs", json={"prompt": "a real job", **SMALL}).json()
        wait_for_job(client, real["id"])
        # An id with a suffix would name the job's own event stream or webhook list in Redis.
        job_id = job_id.replace("0123456789abcdef0123456789abcdef", real["id"])
        assert redis.exists(f"t2i:job:{real['id']}:events")
        responses = [
            client.get(f"/v1/jobs/{job_id}"),
            client.get(f"/v1/jobs/{job_id}/events"),
            client.post(f"/v1/jobs/{job_id}/cancel"),
        ]
    for response in responses:
        assert response.status_code == 404, response.text
        assert response.json()["error"]["type"] == "not_found"


def test_unknown_job_gets_404_envelope(local_stack: Stack) -> None:
    with local_stack.client() as client:
        response = client.get("/v1/jobs/0123456789abcdef0123456789abcdef")
        missing_route = client.get("/v1/nothing-here")
    assert response.status_code == 404
    assert response.json()["error"]["type"] == "not_found"
    assert missing_route.status_code == 404
    assert missing_route.json()["error"]["type"] == "not_found"


def test_a_render_that_raises_fails_the_job_and_the_worker_goes_on(local_stack: Stack) -> None:
    with local_stack.client() as client:
        failed = wait_for_job(client, submit(client, prompt=FAIL_PROMPT)["id"])
        after = render(client, prompt="a quiet harbour")
    assert failed["status"] == "failed"
    assert failed["error"]["type"] == "render_error"
    assert "injected failure" in failed["error"]["message"]
    assert failed["images"] == [] and failed["finished_at"]
    assert after["status"] == "succeeded"


def test_tampered_or_expired_file_links_are_refused(local_stack: Stack) -> None:
    with local_stack.client() as client:
        job = render(client, prompt="a locked door", seed=9)
    url = httpx.URL(job["images"][0]["url"])
    params = dict(url.params)
    tampered = url.copy_with(params={**params, "signature": "0" * 64})
    expired = url.copy_with(params={**params, "expires": "1000"})
    other_key = url.copy_with(path=url.path.replace("/0.png", "/1.png"))
    for bad in (tampered, expired, other_key):
        response = httpx.get(bad, timeout=10)
        assert response.status_code == 403
        assert response.json()["error"]["type"] == "forbidden"


def test_health_ready_and_openapi(local_stack: Stack) -> None:
    with local_stack.client() as client:
        assert client.get("/health").json() == {"status": "ok"}
        ready = client.get("/ready").json()
        spec = client.get("/openapi.json").json()
        docs = client.get("/docs")
    assert ready["status"] == "ready" and ready["checks"]["workers"] == "1 alive"
    assert {"/v1/jobs", "/v1/jobs/{job_id}", "/health", "/ready"} <= set(spec["paths"])
    assert docs.status_code == 200


def test_a_prompt_longer_than_clips_window_renders_whole(local_stack: Stack) -> None:
    prompt = ("a very detailed harbour scene with boats, gulls and nets, " * 40)[:2000]
    with local_stack.client() as client:
        job = render(client, prompt=prompt, seed=11)
    parameters = read_parameters(download(job["images"][0]["url"]))
    assert parameters.startswith(prompt + "\n")
