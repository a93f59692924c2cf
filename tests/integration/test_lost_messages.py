"""A job whose message is lost is sent again, but not forever: every re-send counts as a retry.

The API's reaper re-sends a job whose message no worker took. Here a helper thread takes the
job's messages off the broker queue as soon as they land there (as a Redis that lost them would),
with no worker running, so only the retry cap ends the job.
"""

import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from redis import Redis

from tests.conftest import _stack_env
from tests.support import Process, Stack, start_redis, wait_for_job, wait_until

MAX_RETRIES = 2
QUICK = {"prompt": "a lost message", "width": 256, "height": 256, "num_inference_steps": 1}


@pytest.fixture(scope="module")
def lossy_stack(workdir: Path, model_cache: Path) -> Iterator[Stack]:
    stack_dir = workdir / "lossy-stack"
    stack_dir.mkdir()
    # A Redis of its own: a worker of another module's stack on a shared server would take the
    # messages this module means to lose.
    redis, redis_port = start_redis(stack_dir / "redis")
    env = _stack_env(
        redis_port,
        0,
        stack_dir,
        model_cache,
        # Long enough that a late worker admits the job it took before the reaper, which sees
        # an empty queue and an unstarted job as a lost message, sends it again.
        T2I_REDISPATCH_AFTER_S="2",
        T2I_REAP_INTERVAL_S="0.2",
        T2I_JOB_MAX_RETRIES=str(MAX_RETRIES),
    )
    stack = Stack(env, stack_dir, with_worker=False).start()
    yield stack
    stack.stop()
    redis.stop()


class MessageThief:
    """Takes one job's messages off its broker queue as they arrive, up to `limit` of them."""

    def __init__(self, redis: Redis, queue: str, job_id: str, limit: int) -> None:
        self._redis, self._queue, self._job_id, self._limit = redis, queue, job_id, limit
        self.taken = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "MessageThief":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set() and self.taken < self._limit:
            for message in self._redis.lrange(self._queue, 0, -1):
                if self._job_id.encode() in message and self._redis.lrem(self._queue, 0, message):
                    self.taken += 1
            self._stop.wait(0.02)


def _submit(stack: Stack) -> str:
    with stack.client() as client:
        return client.post("/v1/jobs", json=QUICK).raise_for_status().json()["id"]


def test_a_job_whose_every_message_is_lost_fails_after_the_retry_cap(lossy_stack: Stack) -> None:
    redis = Redis.from_url(lossy_stack.env["T2I_REDIS_URL"])
    queue = lossy_stack.env.get("T2I_QUEUE_NAME", "txt2img")
    try:
        job_id = _submit(lossy_stack)
        with MessageThief(redis, queue, job_id, limit=100) as thief, lossy_stack.client() as client:
            job = wait_for_job(client, job_id, timeout_s=60)
        assert job["status"] == "failed"
        assert job["error"]["type"] == "worker_lost"
        assert "message never reached a worker" in job["error"]["message"]
        # The first send and one re-send per retry, then no more.
        assert thief.taken == MAX_RETRIES + 1
        assert job["attempt"] == MAX_RETRIES + 1
    finally:
        redis.close()


def test_a_job_whose_message_is_lost_once_still_renders_when_a_worker_comes(
    lossy_stack: Stack,
) -> None:
    redis = Redis.from_url(lossy_stack.env["T2I_REDIS_URL"])
    queue = lossy_stack.env.get("T2I_QUEUE_NAME", "txt2img")
    worker = Process(
        "worker",
        [sys.executable, "-m", "worker"],
        {**lossy_stack.env, "T2I_PORT": str(lossy_stack.api_port)},
        lossy_stack.workdir / "late-worker.log",
    )
    try:
        job_id = _submit(lossy_stack)
        with MessageThief(redis, queue, job_id, limit=1) as thief:
            wait_until(lambda: thief.taken == 1, 30, "the job's first message to be lost")
            wait_until(lambda: redis.llen(queue) == 1, 30, "the job's message to be sent again")
        worker.start()
        with lossy_stack.client() as client:
            job = wait_for_job(client, job_id, timeout_s=120)
        assert job["status"] == "succeeded", job
        # Attempt 2 is the re-send after the loss; on a loaded machine a worker can take longer
        # than the re-send delay to admit what it took, which counts one more.
        assert job["attempt"] in (2, MAX_RETRIES + 1)
    finally:
        worker.stop()
        redis.close()
