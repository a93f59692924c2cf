"""Two workers serving two different tiny models side by side, one loaded from a single-file
checkpoint; each model has its own queue, so a job only ever reaches a worker that serves it."""

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from redis import Redis

from tests.conftest import run_stack, start_second_model_worker
from tests.support import Process, Stack, wait_for_job, wait_until
from worker.encoding import read_parameters
from worker.tiny_model import SECOND_TINY_MODEL_ID

SMALL = {"width": 256, "height": 256, "num_inference_steps": 2}


@pytest.fixture(scope="module")
def two_models(
    redis_port: int, workdir: Path, model_cache: Path
) -> Iterator[tuple[Stack, Process]]:
    """The default model's stack, and a second worker serving the second tiny model from its
    single-file checkpoint, under the name requests route by."""
    # A busy worker on a loaded machine may miss a heartbeat or two: a model stays served here
    # unless its worker is silent for 15 s.
    stacks = run_stack(
        "two-models", 9, redis_port, workdir, model_cache, T2I_WORKER_HEARTBEAT_MAX_AGE_S="15"
    )
    stack = next(stacks)
    second = start_second_model_worker(stack, model_cache)
    try:
        with stack.client() as client:
            wait_until(
                lambda: _served(client) == {"tiny": 1, SECOND_TINY_MODEL_ID: 1},
                180,
                f"a worker for each model:\n{second.log_tail()}",
            )
        yield stack, second
    finally:
        second.stop()
        next(stacks, None)


def _served(client: httpx.Client) -> dict[str, int]:
    models = client.get("/v1/models").raise_for_status().json()["data"]
    return {model["id"]: model["workers"] for model in models}


def _model_of(job: dict) -> str:
    data = httpx.get(job["images"][0]["url"], timeout=10).raise_for_status().content
    parameters = read_parameters(data)
    assert parameters is not None
    return parameters.rsplit("Model: ", 1)[1].split(",")[0]


def test_models_lists_both_models_with_their_workers_and_queues(
    two_models: tuple[Stack, Process],
) -> None:
    stack, _ = two_models
    with stack.client() as client:
        models = client.get("/v1/models").raise_for_status().json()["data"]
    sizes = {"minimum": 256.0, "maximum": 1024.0, "multiple_of": 8}
    sd15 = {
        "family": "sd15",
        "default_width": 512,
        "default_height": 512,
        "width": sizes,
        "height": sizes,
    }
    assert models == [
        {"id": "tiny", **sd15, "default": True, "workers": 1, "queued": 0, "control_types": []},
        {
            "id": SECOND_TINY_MODEL_ID,
            **sd15,
            "default": False,
            "workers": 1,
            "queued": 0,
            "control_types": [],
        },
    ]
    with stack.client() as client:
        info = client.get("/info").raise_for_status().json()
    queues = {worker["model"]: worker["queue"] for worker in info["workers"]}
    assert queues == {"tiny": "txt2img", SECOND_TINY_MODEL_ID: f"txt2img@{SECOND_TINY_MODEL_ID}"}


def test_each_job_is_rendered_by_a_worker_of_the_model_it_names(
    two_models: tuple[Stack, Process],
) -> None:
    stack, second = two_models
    named = [None, "tiny", SECOND_TINY_MODEL_ID] * 3
    with stack.client() as client:
        ids = []
        for index, model in enumerate(named):
            body = {**SMALL, "prompt": "a lighthouse", "seed": 7 + index}
            if model is not None:
                body["model"] = model
            response = client.post("/v1/jobs", json=body)
            assert response.status_code == 202, response.text
            ids.append(response.json()["id"])
        jobs = [wait_for_job(client, job_id, timeout_s=120) for job_id in ids]
    for model, job in zip(named, jobs, strict=True):
        assert job["status"] == "succeeded", job
        assert job["request"]["model"] == (model or "tiny")
        assert _model_of(job) == (model or "tiny")
    # Only the second worker took jobs from the second model's queue, and only those.
    taken = second.log_path.read_text().count("succeeded: 1 images")
    assert taken == named.count(SECOND_TINY_MODEL_ID)


def test_the_same_seed_gives_another_image_on_the_other_model(
    two_models: tuple[Stack, Process],
) -> None:
    stack, _ = two_models
    with stack.client() as client:
        files = []
        for model in ("tiny", SECOND_TINY_MODEL_ID):
            response = client.post(
                "/v1/jobs", json={**SMALL, "prompt": "a cat", "seed": 1, "model": model}
            )
            job = wait_for_job(client, response.json()["id"], timeout_s=120)
            files.append(httpx.get(job["images"][0]["url"], timeout=10).content)
    assert files[0] != files[1]


def test_a_model_nobody_serves_gets_422_and_nothing_is_queued(
    two_models: tuple[Stack, Process],
) -> None:
    stack, _ = two_models
    redis = Redis.from_url(stack.env["T2I_REDIS_URL"])
    jobs_before = set(redis.scan_iter("t2i:job:*"))
    with stack.client() as client:
        response = client.post(
            "/v1/jobs", json={**SMALL, "prompt": "a cat", "model": "nobody/serves-this"}
        )
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["details"][0]["type"] == "model_not_served"
    assert "GET /v1/models" in error["message"]
    assert set(redis.scan_iter("t2i:job:*")) == jobs_before
    assert redis.llen("txt2img@nobody/serves-this") == 0
