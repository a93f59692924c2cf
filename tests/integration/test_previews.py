"""Live previews through the service: `preview` events in a job's event stream, the latest preview
on the job while it runs, and `current_image` on A1111's progress route (read with the `webuiapi`
client). Never for a job that did not ask, never another key's."""

import base64
import contextlib
import io
import itertools
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import webuiapi
from PIL import Image
from redis import Redis

from shared.apikeys import ApiKeyStore
from tests.conftest import run_stack
from tests.support import SseEvent, Stack, start_redis, wait_for_job, wait_until

# A long job of another size keeps the worker busy, so the job under test waits in the queue
# until its event stream is open, and every one of its previews is seen live.
BLOCKER = {
    "prompt": "keeps the worker busy",
    "width": 256,
    "height": 256,
    "num_inference_steps": 40,
}
PREVIEWED = {
    "prompt": "a lighthouse at dusk",
    "width": 512,
    "height": 512,
    "num_inference_steps": 8,
    "seed": 3,
    "preview": {"every_n_steps": 2, "format": "jpeg", "max_size": 128},
}
# Mean absolute difference, in levels of 255, between the last preview and the final image at
# the preview's size: measured 6.1. The tiny model's VAE keeps 8x8 block means as latents, so
# the preview's latent-to-RGB map is exact; what is left is the watermark and the JPEG encoding
# of the tiny model's saturated colour blocks (WebP, which halves colour resolution, leaves 40).
LAST_PREVIEW_MEAN_DIFFERENCE = 10.0


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, model_cache: Path) -> Iterator[Stack]:
    workdir = tmp_path_factory.mktemp("previews")
    redis_process, port = start_redis(workdir / "redis")
    try:
        yield from run_stack("previews-stack", 0, port, workdir, model_cache)
    finally:
        redis_process.stop()


def decoded(data_url: str) -> Image.Image:
    header, encoded = data_url.split(",", 1)
    assert header.startswith("data:image/") and header.endswith(";base64")
    return Image.open(io.BytesIO(base64.b64decode(encoded)))


def submit(client: httpx.Client, body: dict) -> dict:
    response = client.post("/v1/jobs", json=body)
    assert response.status_code == 202, response.text
    return response.json()


def follow(client: httpx.Client, job_id: str, opened: threading.Event, events: list) -> None:
    """Read the job's event stream to its end into `events`; `opened` once it answers."""
    fields: dict[str, str] = {}
    with client.stream("GET", f"/v1/jobs/{job_id}/events", timeout=180) as response:
        opened.set()
        for line in response.iter_lines():
            if line and not line.startswith(":"):
                name, _, value = line.partition(": ")
                fields[name] = value
            elif "event" in fields:
                events.append(
                    SseEvent(fields.get("id"), fields["event"], json.loads(fields["data"]))
                )
                fields = {}


def behind_a_blocker(stack: Stack, body: dict) -> tuple[dict, list]:
    """Submit `body` behind a running blocker, open its event stream, then let it run: the job
    and every event of its stream."""
    with stack.client() as client:
        blocker = submit(client, BLOCKER)
        wait_until(
            lambda: client.get(f"/v1/jobs/{blocker['id']}").json()["status"] == "running",
            120,
            "the blocker to run",
        )
        job = submit(client, body)
        events: list = []
        opened = threading.Event()
        with stack.client() as streaming:
            reader = threading.Thread(target=follow, args=(streaming, job["id"], opened, events))
            reader.start()
            assert opened.wait(30)
            client.post(f"/v1/jobs/{blocker['id']}/cancel").raise_for_status()
            reader.join(180)
        assert not reader.is_alive()
        return wait_for_job(client, job["id"]), events


def test_a_job_gets_its_previews_in_order_each_an_image_the_last_close_to_the_result(
    stack: Stack,
) -> None:
    job, events = behind_a_blocker(stack, PREVIEWED)
    assert job["status"] == "succeeded"
    previews = [event.data for event in events if event.event == "preview"]
    assert [preview["step"] for preview in previews] == [2, 4, 6, 8]
    assert {preview["total"] for preview in previews} == {8}
    images = [decoded(preview["image"]) for preview in previews]
    assert all((image.format, image.size) == ("JPEG", (128, 128)) for image in images)
    assert all((p["width"], p["height"]) == (128, 128) for p in previews)
    # Each shows the render further along: no two alike.
    arrays = [np.asarray(image.convert("RGB"), dtype=np.float32) for image in images]
    assert all(np.abs(a - b).mean() > 0 for a, b in itertools.pairwise(arrays))

    final = Image.open(io.BytesIO(httpx.get(job["images"][0]["url"], timeout=10).content))
    small = np.asarray(final.convert("RGB").resize((128, 128), Image.Resampling.BOX), np.float32)
    distance = np.abs(arrays[-1] - small).mean()
    assert distance < LAST_PREVIEW_MEAN_DIFFERENCE, distance
    # Once the job has ended it shows no preview; the stream ended with the job.
    assert job["preview"] is None and events[-1].event == "succeeded"


def test_a_job_that_did_not_ask_gets_no_previews(stack: Stack) -> None:
    body = {key: value for key, value in PREVIEWED.items() if key != "preview"}
    job, events = behind_a_blocker(stack, body)
    assert job["status"] == "succeeded" and job["request"]["preview"] is None
    assert not [event for event in events if event.event == "preview"]
    assert [event.event for event in events if event.event == "progress"]


def test_a_running_job_shows_its_latest_preview_to_its_key_only(stack: Stack) -> None:
    other = stack.create_key("someone else", 100_000)
    long_job = {**PREVIEWED, "num_inference_steps": 150, "preview": {"every_n_steps": 1}}
    with stack.client() as client, stack.client(other) as stranger:
        job = submit(client, long_job)
        seen: dict = {}

        def previewing() -> bool:
            seen.update(client.get(f"/v1/jobs/{job['id']}").json())
            return seen["status"] == "running" and seen["preview"] is not None

        wait_until(previewing, 120, "a preview on the running job")
        preview = seen["preview"]
        assert 1 <= preview["step"] < 150 and preview["total"] == 150
        assert decoded(preview["image"]).size == (256, 256)
        assert stranger.get(f"/v1/jobs/{job['id']}").status_code == 404
        canceled = client.post(f"/v1/jobs/{job['id']}/cancel").json()
        assert canceled["status"] == "canceled" and canceled["preview"] is None


def test_a1111_progress_has_the_running_jobs_current_image(stack: Stack) -> None:
    host, port = stack.base_url.removeprefix("http://").split(":")
    api = webuiapi.WebUIApi(host=host, port=int(port), username="user", password=stack.api_key)
    stranger = webuiapi.WebUIApi(
        host=host,
        port=int(port),
        username="user",
        password=stack.create_key("a stranger", 100_000),
    )

    def render() -> None:
        # Canceled below: the client then raises, which is the end this test wants.
        with contextlib.suppress(RuntimeError):
            api.txt2img(prompt="a slow harbour", width=512, height=512, steps=150)

    rendering = threading.Thread(target=render)
    rendering.start()
    try:
        progress: dict = {}

        def has_image() -> bool:
            progress.update(api.get_progress())
            return bool(progress.get("current_image"))

        wait_until(has_image, 120, "a current_image on /sdapi/v1/progress")
        image = Image.open(io.BytesIO(base64.b64decode(progress["current_image"])))
        assert image.format == "JPEG" and max(image.size) == 256
        assert 0 < progress["progress"] < 1
        # Another key's progress shows neither the job nor its image.
        theirs = stranger.get_progress()
        assert theirs["current_image"] is None and theirs["state"]["job"] == ""
        assert (
            api.get_progress()
            and not api.session.get(
                f"{api.baseurl}/progress", params={"skip_current_image": "true"}
            ).json()["current_image"]
        )
    finally:
        with stack.client() as client:
            running = client.get("/v1/jobs", params={"status": "running"}).json()["data"]
            for job in running:
                client.post(f"/v1/jobs/{job['id']}/cancel")
        rendering.join(120)


def test_a_keys_default_asks_for_previews_for_jobs_that_do_not_say(stack: Stack) -> None:
    redis = Redis.from_url(stack.env["T2I_REDIS_URL"])
    try:
        _, key = ApiKeyStore(redis).create("previews", 100_000, preview_every_n_steps=2)
    finally:
        redis.close()
    body = {key: value for key, value in PREVIEWED.items() if key != "preview"}
    with stack.client(key) as client:
        job = wait_for_job(client, submit(client, body)["id"])
        own = wait_for_job(client, submit(client, {**body, "preview": None})["id"])
    assert job["request"]["preview"] == {"every_n_steps": 2, "format": "webp", "max_size": 256}
    # An explicit null is the key's default too: absent and null are the same request.
    assert own["request"]["preview"] == job["request"]["preview"]
