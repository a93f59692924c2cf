"""The service around the pipeline, on this machine with the tiny model: what the gateway costs
per request, what reads cost as the queue grows, what a job costs beyond its pipeline call, how
throughput grows with worker processes, and what a job costs Redis. Every figure stands beside
its reference from the same run. `python -m bench.service`; JSON to stdout and bench/results/."""

import argparse
import asyncio
import json
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import psutil
from redis import Redis

from shared.apikeys import ApiKeyStore
from shared.jobscripts import FINISHED_EVENTS_TTL_S
from shared.jobstore import JobStore
from shared.keys import RETENTION_KEY, events_key, index_key, job_key, status_index_key
from shared.queue import WORKERS_KEY
from shared.records import new_job_id, utc_now
from shared.schema import GenerationRequest, JobRecord, JobStatus
from tests.support import (
    REPO_ROOT,
    Process,
    api_answers,
    free_port,
    service_env,
    start_redis,
    wait_until,
)

RESULTS_DIR = REPO_ROOT / "bench" / "results"
TERMINAL = {"succeeded", "failed", "canceled", "expired"}
# One image per job, small enough that the service's own costs show beside the render.
QUICK_JOB = {"prompt": "a lighthouse", "width": 256, "height": 256, "num_inference_steps": 2}
# Heavier jobs for worker scaling: the render, not the gateway, is what two workers share.
SCALING_JOB = {"prompt": "a lighthouse", "width": 256, "height": 256, "num_inference_steps": 12}


def _percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


def tree_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process and all its descendants."""
    root = psutil.Process(pid)
    total = 0.0
    for process in [root, *root.children(recursive=True)]:
        try:
            times = process.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


class Cluster:
    """One redis-server, one API (its processes) and any number of workers, on loopback."""

    def __init__(self, workdir: Path, api_processes: int, **env: str) -> None:
        """`env`: the model and other settings of this benchmark's services."""
        self.workdir = workdir
        self.redis_process, self.redis_port = start_redis(workdir / "redis")
        self.api_port = free_port()
        self.env = service_env(
            T2I_REDIS_URL=f"redis://127.0.0.1:{self.redis_port}/0",
            T2I_PORT=str(self.api_port),
            T2I_API_PROCESSES=str(api_processes),
            T2I_MODEL_CACHE_DIR=str(workdir / "models"),
            T2I_DATA_DIR=str(workdir / "data"),
            T2I_MAX_QUEUE_DEPTH="1000000",
            # Each worker process renders on one CPU thread: N workers on N cores is fair.
            T2I_TORCH_THREADS="1",
            **env,
        )
        self.api = Process(
            "api", [sys.executable, "-m", "api"], self.env, workdir / "api.log"
        ).start()
        self.workers: list[Process] = []
        wait_until(lambda: api_answers(self.api, self.base_url), 60, "the API")
        self.api_key = self.new_key()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    def redis(self) -> Redis:
        return Redis(port=self.redis_port)

    def new_key(self) -> str:
        return ApiKeyStore(self.redis()).create("bench", 10**9)[1]

    def owner(self) -> str:
        return self.api_key.split("_")[1]

    def add_workers(self, count: int) -> None:
        for _ in range(count):
            name = f"worker-{len(self.workers)}"
            worker = Process(
                name, [sys.executable, "-m", "worker"], self.env, self.workdir / f"{name}.log"
            ).start()
            self.workers.append(worker)
        expected = len(self.workers)

        def all_ready() -> bool:
            for worker in self.workers:
                if not worker.alive():
                    raise RuntimeError(f"{worker.name} exited:\n{worker.log_tail()}")
            return self.redis().zcard(WORKERS_KEY) >= expected

        wait_until(all_ready, 300, f"{expected} workers")

    def flush(self) -> None:
        self.redis().flushdb()
        self.api_key = self.new_key()

    def stop(self) -> None:
        for process in [self.api, *self.workers, self.redis_process]:
            process.stop()


def _client(cluster: Cluster, concurrency: int) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        base_url=cluster.base_url,
        headers={"Authorization": f"Bearer {cluster.api_key}"},
        timeout=120,
        limits=httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency),
    )


async def _load(
    cluster: Cluster,
    concurrency: int,
    total: int,
    request: Callable[[httpx.AsyncClient], Awaitable[httpx.Response]],
) -> dict[str, Any]:
    """`total` requests from `concurrency` callers: throughput, latency, and the CPU the gateway
    (all its processes) and this load generator spent per request."""
    latencies: list[float] = []
    remaining = total

    async def caller(client: httpx.AsyncClient) -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            started = time.perf_counter()
            response = await request(client)
            latencies.append(time.perf_counter() - started)
            if response.status_code >= 300:
                raise RuntimeError(f"{response.status_code}: {response.text}")

    async with _client(cluster, concurrency) as client:
        # Connections (client to API, API to Redis) and the key's cache warm at this concurrency.
        await asyncio.gather(*(request(client) for _ in range(concurrency)))
        gateway_before = tree_cpu_s(cluster.api.popen.pid)  # type: ignore[union-attr]
        own_before = time.process_time()
        started = time.perf_counter()
        await asyncio.gather(*(caller(client) for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
        own_cpu = time.process_time() - own_before
        gateway_cpu = tree_cpu_s(cluster.api.popen.pid) - gateway_before  # type: ignore[union-attr]
    return {
        "requests": total,
        "per_s": round(total / elapsed, 1),
        "p50_ms": _ms(statistics.median(latencies)),
        "p95_ms": _ms(_percentile(latencies, 0.95)),
        "gateway_cpu_ms_per_request": _ms(gateway_cpu / total),
        "load_generator_cpu_ms_per_request": _ms(own_cpu / total),
    }


def _redis_commands(redis: Redis) -> int:
    return sum(stats["calls"] for stats in redis.info("commandstats").values())


async def gateway(cluster: Cluster, requests: int) -> dict[str, Any]:
    """POST /v1/jobs beside GET /health at each concurrency."""
    figures: dict[str, Any] = {}
    for concurrency in (1, 8, 32, 64):
        total = requests if concurrency > 1 else requests // 4
        health = await _load(cluster, concurrency, total, lambda c: c.get("/health"))
        before = _redis_commands(cluster.redis())
        submit = await _load(
            cluster, concurrency, total, lambda c: c.post("/v1/jobs", json=QUICK_JOB)
        )
        # Counted inside scripts too; the warm-up requests are among them.
        submit["redis_commands_per_request"] = round(
            (_redis_commands(cluster.redis()) - before) / (total + concurrency), 2
        )
        figures[f"c{concurrency}"] = {
            "health": health,
            "submit": submit,
            "load_average_1m": round(psutil.getloadavg()[0], 2),
            "submit_vs_health_cpu": round(
                submit["gateway_cpu_ms_per_request"] / health["gateway_cpu_ms_per_request"], 2
            ),
        }
    return figures


def _fill_queue(cluster: Cluster, store: JobStore, target: int) -> None:
    """Queued jobs of the bench key, straight into the job store, until `target` are queued."""
    owner = cluster.owner()
    request = GenerationRequest(prompt="queued", seed=1, width=256, height=256)
    while store.queue_depth() < target:
        record = JobRecord(
            id=new_job_id(),
            owner=owner,
            status=JobStatus.QUEUED,
            created_at=utc_now(),
            request=request,
        )
        store.create(record)


def _latency(samples: list[float]) -> dict[str, float]:
    return {"p50_ms": _ms(statistics.median(samples)), "p95_ms": _ms(_percentile(samples, 0.95))}


async def _interleaved(client: httpx.AsyncClient, paths: list[str], rounds: int) -> list[dict]:
    """Each path once per round, in turn, so a busy moment of the machine weighs on all alike."""
    samples: list[list[float]] = [[] for _ in paths]
    for _ in range(rounds):
        for path, latencies in zip(paths, samples, strict=True):
            started = time.perf_counter()
            (await client.get(path)).raise_for_status()
            latencies.append(time.perf_counter() - started)
    return [_latency(latencies) for latencies in samples]


async def _walk(client: httpx.AsyncClient, params: dict[str, Any]) -> dict[str, int]:
    """Follow a listing's cursors to its end: pages, empty pages before the last, jobs."""
    pages = empty = found = 0
    cursor = None
    while True:
        answer = (
            await client.get(
                "/v1/jobs", params={**params, **({"cursor": cursor} if cursor else {})}
            )
        ).json()
        pages += 1
        found += len(answer["data"])
        cursor = answer["next_cursor"]
        if cursor is None:
            return {"pages": pages, "empty_pages_with_more_behind": empty, "jobs": found}
        empty += not answer["data"]


async def reads(cluster: Cluster) -> dict[str, Any]:
    """Read paths with 0, 1,000 and 10,000 jobs queued and 200 recent completions."""
    cluster.flush()
    redis = cluster.redis()
    store = JobStore(redis, retention_s=3600)
    now = time.time()
    for n in range(200):
        store.record_completion(0.5, now - 100 + n * 0.5)
    owner = cluster.owner()
    finished = []
    for _ in range(5):
        record = JobRecord(
            id=new_job_id(),
            owner=owner,
            status=JobStatus.QUEUED,
            created_at=utc_now(),
            request=GenerationRequest(prompt="done", seed=1),
        )
        store.create(record)
        store.transition(record.id, JobStatus.RUNNING)
        store.transition(record.id, JobStatus.SUCCEEDED, finished_at=utc_now())
        finished.append(record.id)
    figures: dict[str, Any] = {}
    async with _client(cluster, 1) as client:
        for depth in (0, 1000, 10000):
            _fill_queue(cluster, store, depth)
            newest = (await client.get("/v1/jobs", params={"limit": 1})).json()["data"][0]["id"]
            one, queued, listing = await _interleaved(
                client,
                [f"/v1/jobs/{newest}", "/v1/jobs?status=queued&limit=100", "/v1/jobs?limit=100"],
                rounds=100,
            )
            figures[f"queued_{depth}"] = {
                "get_one_job": one,
                "list_100_queued": queued,
                "list_100_any": listing,
                "list_100_queued_vs_get_one_p50": round(queued["p50_ms"] / one["p50_ms"], 2),
                "succeeded_listing_2_per_page": await _walk(
                    client, {"status": "succeeded", "limit": 2}
                ),
            }
    return figures


async def _wait_all(client: httpx.AsyncClient, ids: list[str]) -> list[dict[str, Any]]:
    """The jobs once the key has none queued or running, asking once a second (a GET per job
    would cost the two cores it shares with the workers more than it tells)."""
    while True:
        usage = (await client.get("/v1/jobs", params={"limit": 1})).json()["key"]
        if usage["queued"] == 0 and usage["running"] == 0:
            break
        await asyncio.sleep(1.0)
    jobs = [(await client.get(f"/v1/jobs/{job_id}")).json() for job_id in ids]
    unfinished = [job["id"] for job in jobs if job["status"] not in TERMINAL]
    if unfinished:
        raise RuntimeError(f"jobs not ended though the key has none queued: {unfinished}")
    return jobs


def _overheads(jobs: list[tuple[float, dict[str, Any]]]) -> list[float]:
    """Each job's client-seen time from POST to its finished answer, less its pipeline call."""
    return [elapsed - job["timings"]["render_s"] for elapsed, job in jobs]


async def _submit_and_wait(
    client: httpx.AsyncClient, output_format: str = "png"
) -> tuple[float, dict[str, Any]]:
    started = time.perf_counter()
    job = {**QUICK_JOB, "output_format": output_format}
    response = await client.post("/v1/jobs", json=job, headers={"Prefer": "wait=60"})
    elapsed = time.perf_counter() - started
    job = response.json()
    if job["status"] != "succeeded":
        raise RuntimeError(f"a job ended {job['status']}: {job}")
    return elapsed, job


async def end_to_end(cluster: Cluster, sequential: int, burst: int) -> dict[str, Any]:
    """POST to succeeded (`Prefer: wait`, so no polling interval) minus the pipeline call."""
    async with _client(cluster, burst) as client:
        await _submit_and_wait(client)
        one_by_one = [await _submit_and_wait(client) for _ in range(sequential)]
        as_jpeg = [await _submit_and_wait(client, "jpeg") for _ in range(sequential)]
        started = time.perf_counter()
        together = await asyncio.gather(*(_submit_and_wait(client) for _ in range(burst)))
        wall = time.perf_counter() - started
    sequential_overheads = _overheads(one_by_one)
    queued = [job["timings"]["queued_s"] for _, job in one_by_one]
    stored = [job["timings"]["upload_s"] for _, job in one_by_one]
    calls = {job["batch"]["id"]: job["timings"]["render_s"] for _, job in together}
    return {
        "c1_jobs": sequential,
        "c1_overhead_p50_ms": _ms(statistics.median(sequential_overheads)),
        "c1_overhead_p95_ms": _ms(_percentile(sequential_overheads, 0.95)),
        "c1_render_p50_ms": _ms(statistics.median(j["timings"]["render_s"] for _, j in one_by_one)),
        # Where the overhead goes: from the POST until the device took the job, and encoding
        # (PNG) and storing its image; the rest is the API's and the worker's own handling.
        "c1_until_admitted_p50_ms": _ms(statistics.median(queued)),
        "c1_encode_and_store_p50_ms": _ms(statistics.median(stored)),
        # The same with JPEG, which encodes a (noise) image far faster than PNG.
        "c1_jpeg_overhead_p50_ms": _ms(statistics.median(_overheads(as_jpeg))),
        "load_average_1m": round(psutil.getloadavg()[0], 2),
        "burst_jobs": burst,
        "burst_wall_s": round(wall, 3),
        "burst_pipeline_calls": len(calls),
        "burst_pipeline_busy_s": round(sum(calls.values()), 3),
        # The burst's time that was not a pipeline call: queueing behind the one device excluded.
        "burst_overhead_s": round(wall - sum(calls.values()), 3),
    }


async def _scaling_round(cluster: Cluster, jobs: int) -> dict[str, Any]:
    """One round: all jobs submitted first, then the rate from the first start to the last
    finish, and the CPU the workers and this load generator spent meanwhile."""
    count = len(cluster.workers)
    own_before = time.process_time()
    workers_before = sum(tree_cpu_s(w.popen.pid) for w in cluster.workers)  # type: ignore[union-attr]
    async with _client(cluster, 8) as client:
        submitted = await asyncio.gather(
            *(client.post("/v1/jobs", json=SCALING_JOB) for _ in range(jobs))
        )
        finished = await _wait_all(client, [answer.json()["id"] for answer in submitted])
    own_cpu = time.process_time() - own_before
    workers_cpu = (
        sum(tree_cpu_s(w.popen.pid) for w in cluster.workers)  # type: ignore[union-attr]
        - workers_before
    )
    if failed := [job for job in finished if job["status"] != "succeeded"]:
        raise RuntimeError(f"{len(failed)} scaling jobs did not succeed; one: {failed[0]}")
    first = min(datetime.fromisoformat(job["started_at"]) for job in finished)
    last = max(datetime.fromisoformat(job["finished_at"]) for job in finished)
    span = (last - first).total_seconds()
    batches = {job["batch"]["id"]: job["batch"]["images"] for job in finished}
    return {
        "images_per_s": round(jobs / span, 3),
        "span_s": round(span, 3),
        "mean_batch_images": round(statistics.mean(batches.values()), 2),
        "load_generator_cpu_s": round(own_cpu, 3),
        # What the workers spent per image, and how much of a core each one got: on a
        # machine shared with other work, the cores two workers need may not be free.
        "worker_cpu_s_per_image": round(workers_cpu / jobs, 3),
        "cores_used_per_worker": round(workers_cpu / span / count, 2),
        "load_average_1m": round(psutil.getloadavg()[0], 2),
    }


async def worker_scaling(
    cluster: Cluster, jobs: int, counts: list[int], rounds: int
) -> dict[str, Any]:
    """Images per second with 1, 2 and 4 worker processes (one torch thread each), the median
    of `rounds` rounds each: a shared machine's other work moves single rounds by 10%."""
    figures: dict[str, Any] = {}
    for count in counts:
        cluster.add_workers(count - len(cluster.workers))
        measured = [await _scaling_round(cluster, jobs) for _ in range(rounds)]
        figures[f"workers_{count}"] = {
            "images": jobs,
            "images_per_s": statistics.median(r["images_per_s"] for r in measured),
            "rounds": measured,
        }
    base = figures[f"workers_{counts[0]}"]["images_per_s"]
    for count in counts[1:]:
        figures[f"workers_{count}"]["vs_one_worker"] = round(
            figures[f"workers_{count}"]["images_per_s"] / base, 2
        )
    return figures


def _key_bytes(redis: Redis, keys: list[str]) -> int:
    return sum(redis.memory_usage(key, samples=0) or 0 for key in keys)


async def redis_bytes(cluster: Cluster, jobs: int) -> dict[str, Any]:
    """Redis memory per finished job, key by key (MEMORY USAGE): its record, its share of the
    indexes, and its events while they are kept for late resumes."""
    redis = cluster.redis()
    owner = cluster.owner()
    shared = [
        index_key(owner),
        *(status_index_key(owner, status) for status in JobStatus),
        RETENTION_KEY,
    ]
    shared_before = _key_bytes(redis, shared)
    async with _client(cluster, 8) as client:
        submitted = await asyncio.gather(
            *(client.post("/v1/jobs", json=QUICK_JOB) for _ in range(jobs))
        )
        ids = [answer.json()["id"] for answer in submitted]
        await _wait_all(client, ids)
    records = _key_bytes(redis, [job_key(job_id) for job_id in ids])
    indexes = _key_bytes(redis, shared) - shared_before
    streams = _key_bytes(redis, [events_key(job_id) for job_id in ids])
    return {
        "jobs": jobs,
        "record_bytes_per_job": round(records / jobs),
        "index_bytes_per_job": round(indexes / jobs),
        "event_stream_bytes_per_job": round(streams / jobs),
        "bytes_per_job_while_events_kept": round((records + indexes + streams) / jobs),
        "bytes_per_finished_job": round((records + indexes) / jobs),
        "event_stream_ttl_after_finish_s": FINISHED_EVENTS_TTL_S,
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    figures: dict[str, Any] = {
        "machine": {
            "cpus": psutil.cpu_count(),
            "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(),
            "device": "cpu (tiny model)",
        },
        "api_processes": args.api_processes,
    }
    with tempfile.TemporaryDirectory(prefix="t2i-bench-") as workdir:
        cluster = Cluster(
            Path(workdir),
            args.api_processes,
            T2I_MODEL_ID="tiny",
            T2I_HEARTBEAT_INTERVAL_S="1",
            T2I_WORKER_HEARTBEAT_MAX_AGE_S="5",
        )
        phases = args.phases.split(",")
        try:
            if "gateway" in phases:
                figures["gateway"] = await gateway(cluster, args.requests)
            if "reads" in phases:
                figures["reads"] = await reads(cluster)
            cluster.flush()
            if "end_to_end" in phases:
                cluster.add_workers(1)
                figures["end_to_end"] = await end_to_end(cluster, args.sequential, args.burst)
                figures["redis"] = await redis_bytes(cluster, 50)
            if "workers" in phases:
                figures["worker_scaling"] = await worker_scaling(
                    cluster,
                    args.scaling_jobs,
                    [int(n) for n in args.workers.split(",")],
                    args.scaling_rounds,
                )
        finally:
            cluster.stop()
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--api-processes", type=int, default=psutil.cpu_count() or 1)
    parser.add_argument("--requests", type=int, default=800, help="per gateway level")
    parser.add_argument("--sequential", type=int, default=30)
    parser.add_argument("--burst", type=int, default=16)
    # Enough batches per worker that the last one's imbalance (one worker idle while the other
    # finishes) is a small part of a round: with 64 jobs, 8 batches of 8, it cost two workers
    # about a tenth of their rate.
    parser.add_argument("--scaling-jobs", type=int, default=192)
    parser.add_argument("--workers", default="1,2,4")
    parser.add_argument("--scaling-rounds", type=int, default=3)
    parser.add_argument("--phases", default="gateway,reads,end_to_end,workers")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    figures = asyncio.run(run(args))
    figures["finished_at"] = datetime.now(UTC).isoformat(timespec="seconds")
    text = json.dumps(figures, indent=2)
    print(text)
    out = args.out or RESULTS_DIR / f"{datetime.now(UTC):%Y-%m-%d}-service-cpu.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + "\n")


if __name__ == "__main__":
    main()
