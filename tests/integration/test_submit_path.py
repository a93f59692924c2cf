"""The submit path neither leaks nor duplicates: input images go when no job is made, a replay
spends no rate-limit token, a key over its limit costs no fetch, and a job the primary holds is
answered as made even when no replica confirms it."""

import base64
import io
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image
from redis import Redis

from tests.support import ImageServer, Stack, service_env, start_redis, wait_for_job

QUICK = {"width": 256, "height": 256, "num_inference_steps": 2}


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 40, 90)).save(buffer, format="PNG")
    return buffer.getvalue()


def _stored_inputs(stack: Stack) -> set[Path]:
    return set((stack.workdir / "data").rglob("inputs/*"))


def test_an_idempotency_conflict_leaves_no_input_images_behind(local_stack: Stack) -> None:
    before = _stored_inputs(local_stack)
    headers = {"Idempotency-Key": "leak-check-1"}
    with local_stack.client() as client:
        first = client.post("/v1/jobs", json={"prompt": "first", **QUICK}, headers=headers)
        assert first.status_code == 202, first.text
        init = base64.b64encode(_png()).decode()
        other = {"prompt": "another body", "init_image": init, "strength": 0.5, **QUICK}
        conflict = client.post("/v1/jobs", json=other, headers=headers)
    assert conflict.status_code == 409, conflict.text
    assert conflict.json()["error"]["details"] == {"job_id": first.json()["id"]}
    assert _stored_inputs(local_stack) == before


def test_a_replay_spends_no_token_and_new_jobs_still_count(local_stack: Stack) -> None:
    key = local_stack.create_key("two a minute", rate_limit_per_min=2)
    body = {"prompt": "replayed", **QUICK}
    headers = {"Idempotency-Key": "replay-1"}
    with local_stack.client(key) as client:
        first = client.post("/v1/jobs", json=body, headers=headers)
        assert first.status_code == 202, first.text
        assert first.headers["RateLimit-Remaining"] == "1"
        for _ in range(5):
            replay = client.post("/v1/jobs", json=body, headers=headers)
            assert replay.status_code == 200, replay.text
            assert replay.headers["Idempotent-Replayed"] == "true"
            assert replay.json()["id"] == first.json()["id"]
            assert replay.headers["RateLimit-Remaining"] == "1"
        second = client.post("/v1/jobs", json={**body, "prompt": "new"})
        assert second.status_code == 202, second.text
        third = client.post("/v1/jobs", json={**body, "prompt": "newer"})
    assert third.status_code == 429, third.text
    assert third.json()["error"]["type"] == "rate_limited"


@pytest.fixture
def counting_server() -> Iterator[ImageServer]:
    server = ImageServer(_png())
    yield server
    server.close()


def test_a_key_over_its_limit_costs_no_image_fetch(
    webhook_stack: Stack, counting_server: ImageServer
) -> None:
    # The webhook stack allow-lists 127.0.0.1 for the SSRF guard, input image URLs included.
    key = webhook_stack.create_key("one a minute", rate_limit_per_min=1)
    url = counting_server.url
    with webhook_stack.client(key) as client:
        spent = client.post("/v1/jobs", json={"prompt": "the one token", **QUICK})
        assert spent.status_code == 202, spent.text
        refused = client.post(
            "/v1/jobs", json={"prompt": "over", "init_image": url, "strength": 0.5, **QUICK}
        )
    assert refused.status_code == 429, refused.text
    assert counting_server.requests == 0


@pytest.fixture(scope="module")
def unreplicated_stack(
    tmp_path_factory: pytest.TempPathFactory, model_cache: Path
) -> Iterator[Stack]:
    """A stack whose Redis has no replica, told to wait for one."""
    workdir = tmp_path_factory.mktemp("unreplicated")
    redis, port = start_redis(workdir / "redis")
    env = service_env(
        T2I_REDIS_URL=f"redis://127.0.0.1:{port}/0",
        T2I_MODEL_ID="tiny",
        T2I_MODEL_CACHE_DIR=str(model_cache),
        T2I_DATA_DIR=str(workdir / "data"),
        T2I_HEARTBEAT_INTERVAL_S="1",
        T2I_REDIS_REPLICA_ACKS="1",
        T2I_REDIS_REPLICA_ACK_TIMEOUT_S="0.2",
    )
    stack = Stack(env, workdir)
    try:
        yield stack.start()
    finally:
        stack.stop()
        redis.stop()


def test_a_job_no_replica_confirmed_is_answered_as_made_and_runs(
    unreplicated_stack: Stack,
) -> None:
    with unreplicated_stack.client() as client:
        answer = client.post("/v1/jobs", json={"prompt": "primary only", **QUICK})
        assert answer.status_code == 202, answer.text
        assert answer.headers["X-Replication"] == "pending"
        job = wait_for_job(client, answer.json()["id"], timeout_s=60)
    assert job["status"] == "succeeded", job
    redis = Redis.from_url(unreplicated_stack.env["T2I_REDIS_URL"])
    try:
        assert len(list(redis.scan_iter("t2i:job:*[0-9a-f]"))) == 1
    finally:
        redis.close()
