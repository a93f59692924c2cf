"""Retention keeps up with the finish rate of a large pool: an API process deletes jobs that
finish far faster than one batch per sweep interval, images included, and /metrics shows the
backlog and its lag while it lasts."""

import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from redis import Redis

from api.sweeper import RoundLock, sweep_once
from shared.jobstore import JobStore
from shared.keys import QUEUE_KEY, RETENTION_KEY
from shared.queue import make_celery
from shared.records import new_job_id, utc_now
from shared.schema import GenerationRequest, JobRecord, JobStatus
from shared.settings import CoreSettings, StorageSettings, WebhookSettings
from shared.storage import LocalStorage, image_key, make_storage
from shared.webhooks import Webhooks
from tests.support import Stack, service_env, wait_until

RETENTION_S = 1
# Long next to a batch: a sweeper that took one batch per interval would delete 40 jobs/s.
SWEEP_INTERVAL_S = 5
FINISH_RATE = 200
JOBS = 1500
# After the last job: its retention, an idle interval, and ample time to delete what is left.
DRAIN_S = RETENTION_S + SWEEP_INTERVAL_S + 14


@pytest.fixture
def api(redis_client: Redis, redis_port: int, tmp_path: Path) -> Iterator[Stack]:
    env = service_env(
        T2I_REDIS_URL=f"redis://127.0.0.1:{redis_port}/15",
        T2I_MODEL_ID="tiny",
        T2I_DATA_DIR=str(tmp_path / "data"),
        T2I_RETENTION_S=str(RETENTION_S),
        T2I_SWEEP_INTERVAL_S=str(SWEEP_INTERVAL_S),
        # Two processes share the sweeping through its lock, and /metrics sums their counts.
        T2I_API_PROCESSES="2",
    )
    stack = Stack(env, tmp_path, with_worker=False).start()
    yield stack
    stack.stop()


def finish_jobs(store: JobStore, storage: LocalStorage, stop: threading.Event) -> None:
    """Jobs as a worker pool ends them, FINISH_RATE a second: created, running, succeeded, each
    with an image in storage."""
    request = GenerationRequest(prompt="a retention test", seed=1, width=256, height=256)
    started = time.monotonic()
    for n in range(JOBS):
        if stop.is_set():
            return
        delay = started + n / FINISH_RATE - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        record = JobRecord(
            id=new_job_id(),
            owner="retention",
            status=JobStatus.QUEUED,
            created_at=utc_now(),
            request=request,
        )
        store.create(record)
        key = image_key("images", record.id, 1, 0, "png")
        storage.put(key, b"not really a png", "image/png")
        store.transition(record.id, JobStatus.RUNNING, expected=JobStatus.QUEUED)
        store.transition(record.id, JobStatus.SUCCEEDED, expected=JobStatus.RUNNING)


def retention_metrics(base_url: str) -> dict[str, float]:
    text = httpx.get(f"{base_url}/metrics", timeout=10).text
    return {
        sample.name: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name
        in {
            "txt2img_retention_backlog_jobs",
            "txt2img_retention_lag_seconds",
            "txt2img_jobs_deleted_total",
        }
    }


def test_retention_keeps_up_with_200_finished_jobs_a_second(
    api: Stack, redis_client: Redis, tmp_path: Path
) -> None:
    store = JobStore(redis_client, retention_s=RETENTION_S)
    storage = make_storage(StorageSettings(data_dir=tmp_path / "data", key_prefix="images"))
    assert isinstance(storage, LocalStorage)
    stop = threading.Event()
    producer = threading.Thread(target=finish_jobs, args=(store, storage, stop))
    producer.start()
    seen = {"backlog": 0.0, "lag": 0.0}
    try:
        while producer.is_alive():
            metrics = retention_metrics(api.base_url)
            seen["backlog"] = max(seen["backlog"], metrics["txt2img_retention_backlog_jobs"])
            seen["lag"] = max(seen["lag"], metrics["txt2img_retention_lag_seconds"])
            time.sleep(0.5)
    finally:
        stop.set()
        producer.join()

    wait_until(
        lambda: redis_client.zcard(RETENTION_KEY) == 0,
        DRAIN_S,
        "every job past its retention to be deleted",
    )
    metrics = retention_metrics(api.base_url)
    assert metrics["txt2img_retention_backlog_jobs"] == 0
    assert metrics["txt2img_retention_lag_seconds"] == 0
    assert metrics["txt2img_jobs_deleted_total"] >= JOBS
    # Between sweeps, jobs pass their retention: the gauges showed them waiting.
    assert seen["backlog"] > 0 and seen["lag"] > 0
    assert not list(storage.root.glob("images/*")), "images of deleted jobs are left"
    assert not redis_client.keys("t2i:jobs:retention*")


def sweeper_services(redis: Redis, tmp_path: Path, retention_s: int) -> SimpleNamespace:
    """What a sweep round uses of an API process's services, with real parts."""
    port = redis.connection_pool.connection_kwargs["port"]
    core = CoreSettings(redis_url=f"redis://127.0.0.1:{port}/15", queue_timeout_s=1)
    storage_settings = StorageSettings(data_dir=tmp_path / "data", key_prefix="images")
    return SimpleNamespace(
        core=core,
        store=JobStore(redis, retention_s=retention_s),
        storage=make_storage(storage_settings),
        storage_settings=storage_settings,
        webhooks=Webhooks(redis, make_celery(core), WebhookSettings(), retention_s),
    )


def queue(store: JobStore, count: int, waited_s: float) -> list[str]:
    request = GenerationRequest(prompt="waiting", seed=1)
    ids = []
    for _ in range(count):
        created = utc_now() - timedelta(seconds=waited_s)
        record = JobRecord(
            id=new_job_id(), status=JobStatus.QUEUED, created_at=created, request=request
        )
        store.create(record)
        ids.append(record.id)
    return ids


def test_one_round_expires_every_job_that_waited_too_long_however_many(
    redis_client: Redis, tmp_path: Path
) -> None:
    services = sweeper_services(redis_client, tmp_path, retention_s=3600)
    overdue = queue(services.store, 450, waited_s=60)
    fresh = queue(services.store, 3, waited_s=0)

    swept = sweep_once(services)  # type: ignore[arg-type]

    assert (swept.expired, swept.deleted, swept.more) == (450, 0, False)
    assert {services.store.status(job_id) for job_id in overdue} == {JobStatus.EXPIRED}
    assert [member.decode() for member in redis_client.zrange(QUEUE_KEY, 0, -1)] == fresh


def test_a_round_whose_lock_another_process_took_stops_and_leaves_the_rest(
    redis_client: Redis, tmp_path: Path
) -> None:
    services = sweeper_services(redis_client, tmp_path, retention_s=1)
    queue(services.store, 3, waited_s=60)
    lock = RoundLock(redis_client, "t2i:sweeper:lock", round_s=1)
    # The lock lapsed and another process holds it now: this one's round must not run on.
    redis_client.set("t2i:sweeper:lock", "another process")

    swept = sweep_once(services, lock)  # type: ignore[arg-type]

    assert (swept.expired, swept.more) == (0, True)
    assert redis_client.zcard(QUEUE_KEY) == 3
    assert redis_client.get("t2i:sweeper:lock") == b"another process"
