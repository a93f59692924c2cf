"""Redis paused while a worker admits jobs: admission rides out a blip, and the jobs run as the
same attempt; a longer outage hands them back. Neither lapses as if their worker were lost."""

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from redis import Redis

from shared.keys import LEASES_KEY
from tests.conftest import run_stack
from tests.support import Stack, start_redis, wait_for_job, wait_until

QUICK = {"width": 256, "height": 256, "num_inference_steps": 2}
# Longer than the worker's Redis timeout (T2I_REDIS_TIMEOUT_S) and the storage probe's interval,
# shorter than the admission's retries (a few seconds) and the leases.
BLIP_MS = 2500
# Longer than the admission's retries, shorter than the leases.
OUTAGE_MS = 6500


@pytest.fixture
def blip_stack(tmp_path: Path, model_cache: Path) -> Iterator[tuple[Stack, Redis]]:
    """A stack with a redis-server of its own, so pausing it disturbs no other test."""
    redis_process, port = start_redis(tmp_path / "redis")
    redis = Redis(port=port)
    try:
        yield from (
            (stack, redis)
            for stack in run_stack(
                "blip-stack",
                0,
                port,
                tmp_path,
                model_cache,
                T2I_STORAGE="local",
                T2I_REDIS_TIMEOUT_S="0.5",
                T2I_LEASE_S="10",
                T2I_MAX_BATCH_IMAGES="4",
                # A lapsed lease would fail the job at once as `worker_lost`.
                T2I_JOB_MAX_RETRIES="0",
            )
        )
    finally:
        redis.close()
        redis_process.stop()


def submit(client: httpx.Client, prompt: str) -> str:
    response = client.post("/v1/jobs", json={"prompt": prompt, **QUICK})
    assert response.status_code == 202, response.text
    return response.json()["id"]


def wait_through_blip(client: httpx.Client, job_id: str, timeout_s: float = 90) -> dict:
    """Poll until the job is terminal; the API answers 503 while Redis is paused."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        response = client.get(f"/v1/jobs/{job_id}")
        if response.status_code != 503:
            job = response.raise_for_status().json()
            if job["status"] in {"succeeded", "failed", "canceled", "expired"}:
                return job
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} did not end within {timeout_s} s")


@pytest.mark.parametrize("pause_ms", [BLIP_MS, OUTAGE_MS])
def test_redis_paused_during_admission_loses_no_job(
    blip_stack: tuple[Stack, Redis], pause_ms: int
) -> None:
    stack, redis = blip_stack
    assert stack.worker is not None
    worker_log = stack.worker.log_path
    images = stack.workdir / "data" / "images"
    aside = images.with_name("images-aside")
    with stack.client() as client:
        assert wait_for_job(client, submit(client, "before the blip"))["status"] == "succeeded"
        # Storage down (its root a file, not a directory): the worker admits nothing, so the
        # jobs below are reserved and wait for admission, which then meets the paused Redis.
        images.rename(aside)
        images.write_text("not a directory")
        tripwire = submit(client, "the upload that finds storage down")
        wait_until(
            lambda: "admitting no new jobs" in worker_log.read_text(),
            60,
            "the worker to find storage down",
        )
        job_ids = [submit(client, f"admitted through a blip {n}") for n in range(3)]
        wait_until(
            lambda: all(redis.zscore(LEASES_KEY, job_id) is not None for job_id in job_ids),
            30,
            "the worker to reserve the jobs",
        )
        redis.execute_command("CLIENT", "PAUSE", pause_ms, "WRITE")
        images.unlink()
        aside.rename(images)
        jobs = [wait_through_blip(client, job_id) for job_id in [tripwire, *job_ids]]

    log = worker_log.read_text()
    assert "could not admit job" in log, "the pause never met an admission"
    for job in jobs:
        assert job["status"] == "succeeded", job
    assert jobs[0]["attempt"] == 1
    if pause_ms == BLIP_MS:
        assert [job["attempt"] for job in jobs] == [1, 1, 1, 1]
    else:
        # Handed back, as a stopping worker does: a new attempt, not a retry.
        assert "handing it back" in log
