"""Fair share of the worker pool between API keys, caps on a key's running jobs, and priorities,
through the HTTP API with real workers (the tiny model at a small size, so hundreds of jobs run
in seconds).

While a test submits, its worker is paused (SIGSTOP), so every key's backlog is in the queue
before anything starts: the order the test then sees is the scheduler's, not the submission
race's. The worker's leases are long enough to outlast the pause.
"""

import os
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

import httpx
import pytest
from redis import Redis

from shared.apikeys import ApiKeyStore, PoolShare
from tests.conftest import _stack_env
from tests.support import Process, Stack, wait_for_job, wait_until

MAX_BATCH_IMAGES = 4
# One denoising step at the smallest size: the tests time the scheduler, not the pipeline.
QUICK = {"width": 256, "height": 256, "num_inference_steps": 1}


@pytest.fixture(scope="module")
def fair_stack(redis_port: int, workdir: Path, model_cache: Path) -> Iterator[Stack]:
    stack_dir = workdir / "fair-stack"
    stack_dir.mkdir()
    env = _stack_env(
        redis_port,
        9,
        stack_dir,
        model_cache,
        T2I_MAX_BATCH_IMAGES=str(MAX_BATCH_IMAGES),
        T2I_LEASE_S="60",
    )
    stack = Stack(env, stack_dir).start()
    yield stack
    stack.stop()


def _key(stack: Stack, name: str, share: PoolShare) -> str:
    redis = Redis.from_url(stack.env["T2I_REDIS_URL"])
    try:
        return ApiKeyStore(redis).create(name, 100_000, share)[1]
    finally:
        redis.close()


@contextmanager
def _paused(worker: Process) -> Iterator[None]:
    os.kill(worker.popen.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(worker.popen.pid, signal.SIGCONT)


def _submit(client: httpx.Client, count: int, **fields: object) -> list[str]:
    return [
        client.post("/v1/jobs", json={"prompt": f"job {n:04d}", **QUICK, **fields})
        .raise_for_status()
        .json()["id"]
        for n in range(count)
    ]


def _finished(client: httpx.Client, job_ids: list[str], timeout_s: float = 300) -> list[dict]:
    jobs = [wait_for_job(client, job_id, timeout_s) for job_id in job_ids]
    assert {job["status"] for job in jobs} == {"succeeded"}, _unexpected(jobs, {"succeeded"})
    return jobs


def _unexpected(jobs: list[dict], expected: set[str]) -> str:
    """The jobs that ended otherwise, and why: what a failure message needs."""
    return "\n".join(
        f"{job['id']} {job['status']}: {job.get('error')}"
        for job in jobs
        if job["status"] not in expected
    )


def _cancel_the_rest(client: httpx.Client, job_ids: list[str]) -> list[dict]:
    """Cancel what has not started (the test has seen what it came for); every job as it ends."""
    for job_id in job_ids:
        client.post(f"/v1/jobs/{job_id}/cancel")
    jobs = [wait_for_job(client, job_id, 300) for job_id in job_ids]
    expected = {"succeeded", "canceled"}
    assert {job["status"] for job in jobs} <= expected, _unexpected(jobs, expected)
    return [job for job in jobs if job["started_at"] is not None]


def _started(job: dict) -> datetime:
    return datetime.fromisoformat(job["started_at"])


def test_a_burst_of_one_key_does_not_delay_another_keys_jobs(fair_stack: Stack) -> None:
    burst_key = _key(fair_stack, "burst", PoolShare())
    small_key = _key(fair_stack, "small", PoolShare())
    assert fair_stack.worker is not None
    with fair_stack.client(burst_key) as burst, fair_stack.client(small_key) as small:
        with _paused(fair_stack.worker):
            burst_ids = _submit(burst, 200)
            small_ids = _submit(small, 5)
            # The burst waits in the queue, all but the window in the broker.
            assert burst.get("/v1/jobs").json()["key"]["queued"] == 200
            positions = [small.get(f"/v1/jobs/{job_id}").json() for job_id in small_ids]
        small_jobs = _finished(small, small_ids)
        burst_jobs = _cancel_the_rest(burst, burst_ids)
    small_submitted = min(datetime.fromisoformat(job["created_at"]) for job in small_jobs)
    small_done_starting = max(_started(job) for job in small_jobs)
    burst_started_between = sum(
        small_submitted < _started(job) <= small_done_starting for job in burst_jobs
    )
    # One window (a batch per worker) was sent before the small key's jobs came; after that
    # the two keys alternate, and jobs sent later may start at most a window ahead of them.
    assert burst_started_between <= 2 * MAX_BATCH_IMAGES + len(small_ids)
    assert burst_started_between < 20
    # Each small job was told where it stood in the fair order, not behind the whole burst.
    assert max(job["queue_position"] for job in positions) < 20
    print(f"burst jobs started before the small key's last: {burst_started_between}")


def test_weights_share_the_pool_in_their_ratio(fair_stack: Stack) -> None:
    heavy_key = _key(fair_stack, "heavy", PoolShare(weight=3))
    light_key = _key(fair_stack, "light", PoolShare(weight=1))
    assert fair_stack.worker is not None
    with fair_stack.client(heavy_key) as heavy, fair_stack.client(light_key) as light:
        with _paused(fair_stack.worker):
            heavy_ids = _submit(heavy, 200)
            light_ids = _submit(light, 100)

        wait_until(
            lambda: _count_started(heavy) + _count_started(light) >= 200, 600, "200 jobs to start"
        )
        heavy_jobs = _cancel_the_rest(heavy, heavy_ids)
        light_jobs = _cancel_the_rest(light, light_ids)
    everything = sorted(
        [("heavy", _started(job)) for job in heavy_jobs]
        + [("light", _started(job)) for job in light_jobs],
        key=lambda pair: pair[1],
    )
    # Both keys still had jobs waiting throughout the first 200 starts (150 and 50 expected).
    first = [owner for owner, _ in everything[:200]]
    ratio = first.count("heavy") / first.count("light")
    print(f"heavy:light over the first 200 starts: {first.count('heavy')}:{first.count('light')}")
    assert 3 * 0.8 <= ratio <= 3 * 1.2


def test_an_interactive_job_starts_in_the_next_batch_of_its_key(fair_stack: Stack) -> None:
    key = _key(fair_stack, "mixed", PoolShare())
    # Renders long enough that the batch after the running one is formed before it ends.
    slow = {**QUICK, "num_inference_steps": 4}
    with fair_stack.client(key) as client:
        batch_ids = _submit(client, 100, **slow)
        wait_until(
            lambda: client.get("/v1/jobs").json()["key"]["running"] > 0, 60, "a running batch"
        )
        [interactive_id] = _submit(client, 1, priority="interactive", **slow)
        interactive = wait_for_job(client, interactive_id, 300)
        batch_jobs = _cancel_the_rest(client, batch_ids)
    assert interactive["status"] == "succeeded"
    submitted = datetime.fromisoformat(interactive["created_at"])
    batches_before = {
        job["batch"]["id"]
        for job in batch_jobs
        if submitted < _started(job) < _started(interactive)
        and job["batch"]["id"] != interactive["batch"]["id"]
    }
    # At most the batch that was already prepared for the worker went first.
    assert len(batches_before) <= 1
    canceled_behind_it = len(batch_ids) - len(batch_jobs)
    assert canceled_behind_it > 50, "the interactive job was not behind a backlog"


def test_a_key_never_runs_more_than_its_cap_while_others_keep_starting(
    fair_stack: Stack,
) -> None:
    capped_key = _key(fair_stack, "capped", PoolShare(max_running=2))
    other_key = _key(fair_stack, "other", PoolShare())
    second_worker = Process(
        "worker-2",
        [sys.executable, "-m", "worker"],
        fair_stack.env,
        fair_stack.workdir / "worker-2.log",
    ).start()
    running_seen: list[int] = []
    stop_sampling = threading.Event()

    def sample(client: httpx.Client) -> None:
        while not stop_sampling.is_set():
            running_seen.append(client.get("/v1/jobs").json()["key"]["running"])

    try:
        wait_until(lambda: _live_workers(fair_stack) >= 2, 120, "a second worker")
        with fair_stack.client(capped_key) as capped, fair_stack.client(other_key) as other:
            sampler = threading.Thread(target=sample, args=(fair_stack.client(capped_key),))
            sampler.start()
            capped_ids = _submit(capped, 50)
            other_ids = _submit(other, 20)
            other_jobs = _finished(other, other_ids)
            capped_jobs = _finished(capped, capped_ids)
            stop_sampling.set()
            sampler.join()
    finally:
        stop_sampling.set()
        second_worker.stop()
    spans = [
        (_started(job), datetime.fromisoformat(job["finished_at"]), job["batch"]["id"])
        for job in capped_jobs
    ]
    most_at_once = max(
        sum(start <= moment < end for start, end, _ in spans) for moment, _, _ in spans
    )
    print(f"capped key: at most {most_at_once} running (sampled: {max(running_seen)})")
    assert most_at_once <= 2
    assert max(running_seen) <= 2
    # The other key was not queued behind the capped key's backlog.
    assert max(_started(job) for job in other_jobs) < max(start for start, _, _ in spans)


def _count_started(client: httpx.Client) -> int:
    """The key's jobs that have started: running now, or ended after starting."""
    running = client.get("/v1/jobs").json()["key"]["running"]
    succeeded, cursor = 0, None
    while True:
        params = {"status": "succeeded", "limit": 100, **({"cursor": cursor} if cursor else {})}
        page = client.get("/v1/jobs", params=params).json()
        succeeded += len(page["data"])
        cursor = page["next_cursor"]
        if cursor is None:
            return running + succeeded


def _live_workers(stack: Stack) -> int:
    return len(httpx.get(f"{stack.base_url}/info", timeout=5).json().get("workers", []))
