"""The number the worker autoscaler reads: the job store's backlog per model queue, exact through
every move a job makes, and the KEDA trigger of deploy/k8s/keda.yaml evaluated against the API as
KEDA evaluates it (the same URL path, the same GJSON path, the same replica arithmetic), with no
worker and then with one that drains its queue."""

import math
import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from redis import Redis

from shared.apikeys import ApiKeyStore, PoolShare
from shared.fairshare import FAIR_PREFIX, ahead_key, lane_keys_key
from shared.info import WorkerInfo
from shared.jobstore import Holder, JobStore, RequeueReason
from shared.keys import LEASES_KEY
from shared.queue import WORKERS_KEY, worker_info_key
from shared.records import new_job_id, utc_now
from shared.schema import GenerationRequest, JobRecord, JobStatus
from tests.conftest import run_stack
from tests.support import REPO_ROOT, Process, Stack, wait_until

QUEUE = "txt2img"
OTHER_MODEL = "other-v1.5"
OTHER_QUEUE = f"{QUEUE}@{OTHER_MODEL}"
SMALL = {"width": 256, "height": 256, "num_inference_steps": 2}


def gjson_get(document: Any, path: str) -> Any:
    """The value at a GJSON path (github.com/tidwall/gjson, what KEDA's metrics-api scaler uses):
    the subset of dotted keys, backslash escapes and array indexes; wildcards, pipes, modifiers
    and queries are refused rather than guessed."""
    keys, key, escaped = [], "", False
    for char in path:
        if escaped:
            key, escaped = key + char, False
        elif char == "\\":
            escaped = True
        elif char == ".":
            keys, key = [*keys, key], ""
        elif char in "|*?":
            raise NotImplementedError(f"GJSON {char!r} in {path!r}")
        else:
            key += char
    value = document
    for name in [*keys, key]:
        if name[:1] in {"@", "#", "!", "[", "{"}:
            raise NotImplementedError(f"GJSON {name!r} in {path!r}")
        value = value[int(name)] if isinstance(value, list) else value[name]
    return value


def gjson_escape(key: str) -> str:
    return re.sub(r"([.*?|\\])", r"\\\1", key)


def shipped_scaler() -> tuple[dict[str, Any], dict[str, Any]]:
    """The worker's ScaledObject in deploy/k8s/keda.yaml and its one trigger."""
    documents = yaml.safe_load_all((REPO_ROOT / "deploy/k8s/keda.yaml").read_text())
    (scaler,) = [doc for doc in documents if doc and doc["kind"] == "ScaledObject"]
    (trigger,) = scaler["spec"]["triggers"]
    assert trigger["type"] == "metrics-api" and trigger["metricType"] == "AverageValue"
    return scaler, trigger


def for_queue(trigger: dict[str, Any], queue: str) -> dict[str, Any]:
    """The trigger of another model's ScaledObject, as keda.yaml says to write it."""
    location = trigger["metadata"]["valueLocation"]
    assert location == f"queues.{QUEUE}.jobs"
    metadata = {**trigger["metadata"], "valueLocation": f"queues.{gjson_escape(queue)}.jobs"}
    return {**trigger, "metadata": metadata}


def trigger_value(base_url: str, trigger: dict[str, Any]) -> float:
    """What KEDA's metrics-api scaler reads: a GET of the trigger's URL (here on the test's API),
    with no credentials, and the number at its valueLocation."""
    url = urlsplit(trigger["metadata"]["url"])
    assert trigger["metadata"].get("format", "json") == "json"
    response = httpx.get(
        f"{base_url}{url.path}" + (f"?{url.query}" if url.query else ""),
        headers={"Accept": "application/json"},
        timeout=10,
    )
    assert response.status_code == 200, response.text
    value = gjson_get(response.json(), trigger["metadata"]["valueLocation"])
    assert isinstance(value, int | float) and not isinstance(value, bool), value
    return value


def keda_replicas(scaler: dict[str, Any], trigger: dict[str, Any], value: float) -> int:
    """Where KEDA and the HPA it drives settle for one AverageValue trigger (the HPA's 10%
    tolerance aside): minReplicaCount while the value is not above activationTargetValue,
    otherwise ceil(value / targetValue) between max(minReplicaCount, 1) and maxReplicaCount."""
    spec, metadata = scaler["spec"], trigger["metadata"]
    least, most = spec.get("minReplicaCount", 0), spec.get("maxReplicaCount", 100)
    if value <= float(metadata.get("activationTargetValue", "0")):
        return least
    return min(max(math.ceil(value / float(metadata["targetValue"])), least, 1), most)


def backlog_gauges(base_url: str) -> dict[tuple[str, str], float]:
    """txt2img_backlog_jobs from /metrics, by (queue, state)."""
    text = httpx.get(f"{base_url}/metrics", timeout=10).raise_for_status().text
    (family,) = [
        f for f in text_string_to_metric_families(text) if f.name == "txt2img_backlog_jobs"
    ]
    return {(s.labels["queue"], s.labels["state"]): s.value for s in family.samples}


def _job(store: JobStore, owner: str | None, model: str, lane: str) -> str:
    record = JobRecord(
        id=new_job_id(),
        owner=owner,
        status=JobStatus.QUEUED,
        created_at=utc_now(),
        request=GenerationRequest(prompt="a cat", seed=1, model=model),
    )
    store.create(record, lane=lane)
    return record.id


def test_the_backlog_counts_every_job_of_each_lane_through_every_move(
    redis_client: Redis,
) -> None:
    store = JobStore(redis_client, retention_s=600)
    keys = ApiKeyStore(redis_client)
    capped, _ = keys.create("capped", 1000, PoolShare(max_running=1))
    plain, _ = keys.create("plain", 1000)
    lanes = {QUEUE: "tiny", OTHER_QUEUE: OTHER_MODEL}
    jobs = {
        job_id: lane
        for owner, lane, count in [
            (capped.id, QUEUE, 3),
            (plain.id, QUEUE, 2),
            (None, QUEUE, 1),
            (plain.id, OTHER_QUEUE, 2),
        ]
        for job_id in (_job(store, owner, lanes[lane], lane) for _ in range(count))
    }

    def truth() -> dict[str, tuple[int, int]]:
        counted = {lane: [0, 0] for lane in lanes}
        for job_id, lane in jobs.items():
            status = store.status(job_id)
            if status in (JobStatus.QUEUED, JobStatus.RUNNING):
                counted[lane][status is JobStatus.RUNNING] += 1
        return {lane: (queued, running) for lane, (queued, running) in counted.items()}

    def read() -> dict[str, tuple[int, int]]:
        backlog = store.backlog([QUEUE])
        return {lane: (counts.queued, counts.running) for lane, counts in backlog.items()}

    assert read() == truth() == {QUEUE: (6, 0), OTHER_QUEUE: (2, 0)}
    # The window's job starts; another is sent in its place.
    (first,) = redis_client.zrange(ahead_key(QUEUE), 0, -1)
    holder = Holder("render@a.1", 1)
    store.reserve(first.decode(), 1, holder.worker, 60, QUEUE)
    assert read() == truth() == {QUEUE: (6, 0), OTHER_QUEUE: (2, 0)}
    assert store.admit(first.decode(), holder, utc_now()).applied
    assert read() == truth() == {QUEUE: (5, 1), OTHER_QUEUE: (2, 0)}
    # A job canceled from its key's queue, then one from the window.
    window = {member.decode() for member in redis_client.zrange(ahead_key(QUEUE), 0, -1)}
    waiting = [
        job_id
        for job_id, lane in jobs.items()
        if lane == QUEUE and job_id != first.decode() and job_id not in window
    ]
    assert store.transition(waiting[0], JobStatus.CANCELED).applied
    (sent,) = redis_client.zrange(ahead_key(QUEUE), 0, -1)
    assert store.transition(sent.decode(), JobStatus.CANCELED).applied
    assert read() == truth() == {QUEUE: (3, 1), OTHER_QUEUE: (2, 0)}
    # A lost worker's job goes back to its queue as a new attempt.
    redis_client.zadd(LEASES_KEY, {first.decode(): 0})
    requeued = store.requeue(first.decode(), RequeueReason.LAPSED, max_retries=3)
    assert requeued.requeued
    assert read() == truth() == {QUEUE: (4, 0), OTHER_QUEUE: (2, 0)}
    # A Redis written before the lanes kept their keys: the keys are found once.
    for lane in lanes:
        redis_client.delete(lane_keys_key(lane))
    redis_client.delete(FAIR_PREFIX + "keys-seeded")
    assert read() == truth()
    for job_id in jobs:
        store.transition(job_id, JobStatus.CANCELED)
    assert read() == {QUEUE: (0, 0), OTHER_QUEUE: (0, 0)}
    assert not any(redis_client.exists(lane_keys_key(lane)) for lane in lanes)


@pytest.fixture(scope="module")
def api_only(redis_port: int, workdir: Path, model_cache: Path) -> Iterator[Stack]:
    """The API with no worker: jobs wait until a test starts one."""
    yield from run_stack("autoscaling", 6, redis_port, workdir, model_cache, with_worker="no")


def _pretend_a_worker_serves(redis: Redis, model: str) -> None:
    """A heartbeat of a worker of `model`, so the API takes its jobs; no worker behind it."""
    name = f"render@pretend.{model}"
    info = WorkerInfo(
        name=name,
        model=model,
        queue=f"{QUEUE}@{model}",
        device="cpu",
        max_batch_images=1,
        levers={},
        version="0",
    )
    redis.set(worker_info_key(name), info.model_dump_json())
    redis.zadd(WORKERS_KEY, {name: time.time()})


def _submit(client: httpx.Client, count: int, **body: Any) -> list[str]:
    return [
        client.post("/v1/jobs", json={"prompt": "a lighthouse", **SMALL, **body})
        .raise_for_status()
        .json()["id"]
        for _ in range(count)
    ]


def test_keda_scales_each_models_workers_on_its_backlog_and_back_to_zero(
    api_only: Stack,
) -> None:
    redis = Redis.from_url(api_only.env["T2I_REDIS_URL"])
    keys = ApiKeyStore(redis)
    _, heavy = keys.create("heavy", 100_000)
    _, capped = keys.create("capped", 100_000, PoolShare(max_running=1))
    _, light = keys.create("light", 100_000)
    with (
        api_only.client(heavy) as heavy_client,
        api_only.client(capped) as capped_client,
        api_only.client(light) as light_client,
    ):
        clients = {"heavy": heavy_client, "capped": capped_client, "light": light_client}
        submitted = {
            "heavy": _submit(heavy_client, 7),
            "capped": _submit(capped_client, 4),
            "light": _submit(light_client, 2),
        }
        _pretend_a_worker_serves(redis, OTHER_MODEL)
        _submit(capped_client, 3, model=OTHER_MODEL)
        _submit(light_client, 3, model=OTHER_MODEL)
        listed = heavy_client.get("/v1/models").raise_for_status().json()["data"]
        assert {m["id"]: m["queued"] for m in listed} == {"tiny": 13, OTHER_MODEL: 6}
        # Nobody serves the other model any more: its jobs wait, and its count stays.
        redis.zrem(WORKERS_KEY, f"render@pretend.{OTHER_MODEL}")

        scaler, trigger = shipped_scaler()
        other = for_queue(trigger, OTHER_QUEUE)
        base = api_only.base_url
        assert trigger_value(base, trigger) == 13 and keda_replicas(scaler, trigger, 13) == 2
        assert trigger_value(base, other) == 6 and keda_replicas(scaler, other, 6) == 1
        gauges = backlog_gauges(base)
        assert gauges[(QUEUE, "queued")] == 13 and gauges[(OTHER_QUEUE, "queued")] == 6
        assert gauges[(QUEUE, "running")] == gauges[(OTHER_QUEUE, "running")] == 0
        backlog = httpx.get(f"{base}/backlog", timeout=10).raise_for_status().json()
        assert backlog["queues"][QUEUE] == {
            "model": "tiny",
            "default": True,
            "queued": 13,
            "running": 0,
            "jobs": 13,
            "workers": 0,
        }

        # Canceled jobs leave the count, whether sent to the broker already or still waiting.
        for job_id in submitted["heavy"][:5]:
            heavy_client.post(f"/v1/jobs/{job_id}/cancel").raise_for_status()
        assert trigger_value(base, trigger) == 8 and keda_replicas(scaler, trigger, 8) == 1

        worker = Process(
            "worker", [sys.executable, "-m", "worker"], api_only.env, api_only.workdir / "w.log"
        ).start()
        try:
            seen = [trigger_value(base, trigger)]

            def drained() -> bool:
                if not worker.alive():
                    raise RuntimeError(f"the worker exited:\n{worker.log_tail()}")
                seen.append(trigger_value(base, trigger))
                return seen[-1] == 0

            wait_until(drained, 120, f"the tiny model's queue to drain:\n{worker.log_tail()}")
        finally:
            worker.stop()
        # The count only fell as jobs finished (the capped key's one at a time), down to zero
        # workers; every job it counted rendered.
        assert seen[0] == 8 and seen == sorted(seen, reverse=True), seen
        assert any(0 < value < 8 for value in seen), seen
        assert keda_replicas(scaler, trigger, 0) == 0
        submitted["heavy"] = submitted["heavy"][5:]
        for owner, job_ids in submitted.items():
            for job_id in job_ids:
                job = clients[owner].get(f"/v1/jobs/{job_id}").raise_for_status().json()
                assert job["status"] == "succeeded", job
        # The other model's jobs still wait for a worker of theirs.
        assert trigger_value(base, other) == 6 and keda_replicas(scaler, other, 6) == 1
    redis.close()
