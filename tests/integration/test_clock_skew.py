"""A worker whose clock is half a minute off the API's: its leases and heartbeats are stamped by
Redis's clock, so the API's reaper never takes a live job for lost and /ready counts the worker."""

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from redis import Redis

from shared.queue import WORKERS_KEY
from tests.conftest import _stack_env
from tests.support import Process, Stack, start_redis, wait_for_job, wait_until

LEASE_S = 4
# Renders for longer than a lease on the tiny model (about 10 s here), so its lease is renewed.
SLOW = {"width": 512, "height": 512, "num_inference_steps": 100}

# Loaded at the worker's start from PYTHONPATH: every time.time() the worker reads is off by
# CLOCK_SKEW_S, as on a machine whose clock drifted. Monotonic clocks stay as they are.
_SKEWED_CLOCK = """
import os
import sys
import time

_skew_s = float(os.environ["CLOCK_SKEW_S"])
_time, _time_ns = time.time, time.time_ns
time.time = lambda: _time() + _skew_s
time.time_ns = lambda: _time_ns() + int(_skew_s * 1e9)
print(f"this process's clock is off by {_skew_s:+.0f} s", file=sys.stderr, flush=True)
"""


@pytest.fixture(scope="module")
def api_only(workdir: Path, model_cache: Path) -> Iterator[Stack]:
    """An API (and its reaper) on the true clock, with a Redis of its own; no worker yet."""
    stack_dir = workdir / "clock-skew"
    redis, port = start_redis(stack_dir / "redis")
    env = _stack_env(port, 0, stack_dir, model_cache, T2I_LEASE_S=str(LEASE_S))
    stack = Stack(env, stack_dir, with_worker=False).start()
    yield stack
    stack.stop()
    redis.stop()


@pytest.mark.parametrize("skew_s", [-30, 30])
def test_a_worker_whose_clock_is_off_keeps_its_jobs(api_only: Stack, skew_s: int) -> None:
    hook_dir = api_only.workdir / f"skew{skew_s:+d}"
    hook_dir.mkdir()
    (hook_dir / "sitecustomize.py").write_text(_SKEWED_CLOCK)
    python_path = os.pathsep.join(filter(None, [str(hook_dir), os.environ.get("PYTHONPATH")]))
    env = {**api_only.env, "PYTHONPATH": python_path, "CLOCK_SKEW_S": str(skew_s)}
    worker = Process("worker", [sys.executable, "-m", "worker"], env, hook_dir / "worker.log")
    redis = Redis.from_url(api_only.env["T2I_REDIS_URL"])
    worker.start()
    try:
        wait_until(lambda: redis.zcard(WORKERS_KEY) > 0, 120, "the skewed worker's heartbeat")
        assert f"clock is off by {skew_s:+d} s" in worker.log_tail(400)
        with api_only.client() as client:
            submitted = client.post("/v1/jobs", json={"prompt": "skewed", **SLOW})
            job = wait_for_job(client, submitted.raise_for_status().json()["id"], timeout_s=240)
            assert (job["status"], job["attempt"]) == ("succeeded", 1), (job, worker.log_tail())
            # Held past its first lease: each renewal had to land in the future by the reaper's
            # clock, not the worker's.
            assert job["timings"]["render_s"] > LEASE_S
            # Its heartbeat counts by Redis's clock too, whatever the worker's says.
            assert client.get("/ready").status_code == 200
    finally:
        worker.stop()
        redis.delete(WORKERS_KEY)
        redis.close()
