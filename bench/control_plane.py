"""The control plane's cost per job, and how many GPUs one Redis primary can serve.

One run starts a redis-server, the real API (`python -m api`, local storage in a temp dir) and N
real workers whose renderer is simulated (`T2I_MODEL_ID=simulated:<s>`, worker/simulated.py: a
sleep per image and a flat image of the size asked for), so the queue, the job store, encoding,
storage, progress, status and events all run for real while no model is loaded. It submits
`--jobs` jobs from `--keys` API keys at once (`--concurrency` callers), waits for them as a client
would (each key's counts once a second, then one GET per job), and divides what Redis and the
API spent by the jobs:

- Redis commands per job: `INFO commandstats` calls (commands inside Lua scripts counted too),
  after `CONFIG RESETSTAT`;
- Redis CPU per job: `used_cpu_user + used_cpu_sys` of `INFO cpu` (the server's whole process:
  network I/O, parsing, background work), and the `usec` sum of commandstats (the commands'
  execution by the wall clock: on a machine whose cores are busy, it includes waiting for one);
- API CPU per job: user + system seconds of the API process and its children (psutil);
- jobs/s: jobs over the span from the first job's creation to the last one's end.

From Redis CPU per job: jobs/s one Redis core sustains at `--redis-busy` (70%) busy, divided by
the jobs/s one GPU produces at `--target-render-s` per image; a variant also charges each GPU
its worker's idle traffic (heartbeats, Celery polling: commands per second measured with no job
running, at the run's Redis CPU per command). The same run also
measures `--baseline-workers` (1) worker first, so per-job costs can be compared across worker
counts. `python -m bench.control_plane`; JSON to stdout and bench/results/control_plane.json.
"""

import argparse
import asyncio
import json
import platform
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import psutil
from redis import Redis

from bench import service
from bench.service import tree_cpu_s
from shared.apikeys import ApiKeyStore
from tests.support import REPO_ROOT

RESULTS_FILE = REPO_ROOT / "bench" / "results" / "control_plane.json"
TERMINAL = {"succeeded", "failed", "canceled", "expired"}


class Counters:
    """Redis's command counts and CPU, the API's and the workers' CPU, this process's CPU."""

    def __init__(self, redis: Redis, api_pid: int, worker_pids: list[int]) -> None:
        cpu = redis.info("cpu")
        stats = redis.info("commandstats")
        self.redis_cpu_s = cpu["used_cpu_user"] + cpu["used_cpu_sys"]
        self.commands = sum(entry["calls"] for entry in stats.values())
        self.command_usec = sum(entry["usec"] for entry in stats.values())
        self.by_command = {name.removeprefix("cmdstat_"): entry for name, entry in stats.items()}
        self.api_cpu_s = tree_cpu_s(api_pid)
        self.workers_cpu_s = sum(tree_cpu_s(pid) for pid in worker_pids)
        self.own_cpu_s = time.process_time()
        self.at = time.monotonic()


class Cluster(service.Cluster):
    """The service benchmark's cluster, its workers' renders simulated, with `args.keys` keys."""

    def __init__(self, workdir: Path, args: argparse.Namespace) -> None:
        super().__init__(
            workdir,
            args.api_processes,
            T2I_MODEL_ID=f"simulated:{args.render_s}",
            T2I_STORAGE="local",
            T2I_SAFETY_CHECKER="false",
            T2I_LOG_LEVEL="WARNING",
        )
        self.keys = [
            ApiKeyStore(self.redis()).create(f"bench-{n}", 10**9)[1] for n in range(args.keys)
        ]

    def redis(self) -> Redis:
        return Redis(port=self.redis_port, decode_responses=True)

    def counters(self) -> Counters:
        assert self.api.popen is not None
        pids = [worker.popen.pid for worker in self.workers if worker.popen is not None]
        return Counters(self.redis(), self.api.popen.pid, pids)

    def scale_to(self, count: int) -> None:
        self.add_workers(count - len(self.workers))


def _clients(cluster: Cluster, concurrency: int) -> list[httpx.AsyncClient]:
    return [
        httpx.AsyncClient(
            base_url=cluster.base_url,
            headers={"Authorization": f"Bearer {key}"},
            timeout=120,
            limits=httpx.Limits(max_connections=concurrency),
        )
        for key in cluster.keys
    ]


async def _submit(
    clients: list[httpx.AsyncClient], jobs: int, concurrency: int, request: dict[str, Any]
) -> list[tuple[int, str]]:
    """`jobs` submissions, the keys in turn, from `concurrency` callers: (key index, job id)."""
    ids: list[tuple[int, str]] = []
    next_job = 0

    async def caller() -> None:
        nonlocal next_job
        while next_job < jobs:
            n = next_job
            next_job += 1
            key = n % len(clients)
            body = {**request, "prompt": f"{request['prompt']} {n}"}
            response = await clients[key].post("/v1/jobs", json=body)
            if response.status_code != 202:
                raise RuntimeError(f"{response.status_code}: {response.text}")
            ids.append((key, response.json()["id"]))

    await asyncio.gather(*(caller() for _ in range(concurrency)))
    return ids


async def _wait_all(
    clients: list[httpx.AsyncClient], ids: list[tuple[int, str]]
) -> list[dict[str, Any]]:
    """Each key's counts once a second until none is queued or running, then each job once."""
    while True:
        usages = await asyncio.gather(
            *(client.get("/v1/jobs", params={"limit": 1}) for client in clients)
        )
        if all(u.json()["key"]["queued"] == 0 and u.json()["key"]["running"] == 0 for u in usages):
            break
        await asyncio.sleep(1.0)
    jobs = []
    for key, job_id in ids:
        jobs.append((await clients[key].get(f"/v1/jobs/{job_id}")).raise_for_status().json())
    return jobs


def _at(stamp: str) -> float:
    return datetime.fromisoformat(stamp).timestamp()


async def _round(cluster: Cluster, args: argparse.Namespace, jobs: int) -> dict[str, Any]:
    clients = _clients(cluster, args.concurrency)
    request = {"prompt": "a lighthouse", "width": args.size, "height": args.size}
    try:
        # Warm connections, key caches and the workers' first batches: not measured.
        warm = await _submit(clients, 2 * len(cluster.workers), args.concurrency, request)
        await _wait_all(clients, warm)

        # The workers' own traffic with no job: heartbeats, Celery's polling, leases.
        redis = cluster.redis()
        redis.config_resetstat()
        idle_before = cluster.counters()
        await asyncio.sleep(args.idle_s)
        idle_after = cluster.counters()
        idle_s = idle_after.at - idle_before.at

        redis.config_resetstat()
        before = cluster.counters()
        ids = await _submit(clients, jobs, args.concurrency, request)
        submitted = time.monotonic()
        finished = await _wait_all(clients, ids)
        after = cluster.counters()
    finally:
        for client in clients:
            await client.aclose()
    wall_s = after.at - before.at
    statuses: dict[str, int] = {}
    for job in finished:
        statuses[job["status"]] = statuses.get(job["status"], 0) + 1
    done = [job for job in finished if job["status"] == "succeeded"]
    if len(done) != jobs:
        raise RuntimeError(f"not every job succeeded: {statuses}")
    span_s = max(_at(job["finished_at"]) for job in done) - min(
        _at(job["created_at"]) for job in done
    )
    commands = after.commands - before.commands
    redis_cpu_s = after.redis_cpu_s - before.redis_cpu_s
    top = sorted(after.by_command.items(), key=lambda item: -item[1]["calls"])[:12]
    return {
        "workers": len(cluster.workers),
        "jobs": jobs,
        "jobs_per_s": round(jobs / span_s, 2),
        "span_s": round(span_s, 2),
        "submit_s": round(submitted - before.at, 2),
        "wall_s_with_waiting": round(wall_s, 2),
        "redis_commands_per_job": round(commands / jobs, 1),
        "redis_cpu_us_per_job": round(redis_cpu_s * 1e6 / jobs, 1),
        "redis_command_usec_per_job": round((after.command_usec - before.command_usec) / jobs, 1),
        "api_cpu_ms_per_job": round((after.api_cpu_s - before.api_cpu_s) * 1e3 / jobs, 3),
        "workers_cpu_ms_per_job": round(
            (after.workers_cpu_s - before.workers_cpu_s) * 1e3 / jobs, 3
        ),
        "load_generator_cpu_ms_per_job": round(
            (after.own_cpu_s - before.own_cpu_s) * 1e3 / jobs, 3
        ),
        "redis_busy_fraction_during_run": round(redis_cpu_s / wall_s, 3),
        "idle": {
            "seconds": round(idle_s, 2),
            "redis_commands_per_s_per_worker": round(
                (idle_after.commands - idle_before.commands) / idle_s / len(cluster.workers), 2
            ),
            # The server's whole idle CPU (its own cron included), not per worker.
            "redis_cpu_us_per_s": round(
                (idle_after.redis_cpu_s - idle_before.redis_cpu_s) * 1e6 / idle_s, 1
            ),
        },
        "top_commands_per_job": {
            name: {
                "calls": round(entry["calls"] / jobs, 2),
                "usec": round(entry["usec"] / jobs, 1),
            }
            for name, entry in top
        },
        "load_average_1m": round(psutil.getloadavg()[0], 2),
    }


def _capacity(figures: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """GPUs one Redis primary (one core, `--redis-busy` of it) serves at `--target-render-s`."""
    gpu_jobs_per_s = 1 / args.target_render_s
    budget_us_per_s = args.redis_busy * 1e6
    per_job_us = figures["redis_cpu_us_per_job"]
    # Each idle worker's commands, at what a command cost Redis during the run.
    us_per_command = per_job_us / figures["redis_commands_per_job"]
    idle_us_per_gpu_s = figures["idle"]["redis_commands_per_s_per_worker"] * us_per_command
    redis_jobs_per_s = budget_us_per_s / per_job_us
    return {
        "gpu_jobs_per_s": gpu_jobs_per_s,
        "redis_core_jobs_per_s": round(redis_jobs_per_s, 1),
        "gpus_per_redis_primary": round(redis_jobs_per_s / gpu_jobs_per_s, 1),
        # The same, with each GPU's idle traffic (heartbeats, polling) charged as well.
        "gpus_per_redis_primary_with_idle_traffic": round(
            budget_us_per_s / (gpu_jobs_per_s * per_job_us + idle_us_per_gpu_s), 1
        ),
        # From commandstats usec instead (execution only, by the wall clock).
        "gpus_per_redis_primary_command_time_only": round(
            budget_us_per_s / figures["redis_command_usec_per_job"] / gpu_jobs_per_s, 1
        ),
        # API cores those GPUs' jobs need (`api_cpu_ms_per_job` of this run).
        "api_cores_per_gpu": round(figures["api_cpu_ms_per_job"] / 1e3 * gpu_jobs_per_s, 3),
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    figures: dict[str, Any] = {
        "benchmark": "control_plane",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {
            "cpus": psutil.cpu_count(),
            "python": platform.python_version(),
            "redis": None,
        },
        "config": {
            "workers": args.workers,
            "baseline_workers": args.baseline_workers,
            "jobs": args.jobs,
            "baseline_jobs": args.baseline_jobs,
            "render_s_per_image": args.render_s,
            "image_size": args.size,
            "keys": args.keys,
            "concurrency": args.concurrency,
            "api_processes": args.api_processes,
            "target_render_s_per_image": args.target_render_s,
            "redis_busy": args.redis_busy,
            "idle_s": args.idle_s,
        },
        "method": (
            "real redis-server, API and Celery workers on loopback; workers render with "
            "T2I_MODEL_ID=simulated:<render_s> (a sleep per image, a flat PNG of the size asked "
            "for), max batch 8 (the default). All jobs submitted at once from `keys` keys by "
            "`concurrency` callers; the client then asks each key's counts once a second and GETs "
            "each job once; all of that is in the per-job figures. CONFIG RESETSTAT before the "
            "run; Redis commands from INFO commandstats (scripts' commands included), Redis CPU "
            "from INFO cpu used_cpu_user+used_cpu_sys (whole server) and the commandstats usec "
            "sum (commands' execution, timed by the wall clock: on a busy machine it includes "
            "time the server waited for a core), API CPU from psutil over the API process "
            "and its children. "
            "jobs/s = jobs / (last finished_at - first created_at). gpus_per_redis_primary = "
            "(redis_busy * 1e6 / redis_cpu_us_per_job) / (1 / target_render_s); the "
            "with_idle_traffic variant also charges each GPU its idle worker's commands per second "
            "(measured with no job) at the run's Redis CPU per command. "
            "Everything shares the machine's cores, so on a small machine jobs/s "
            "is the control plane's ceiling there, not the GPUs'; CPU per job is the portable "
            "figure."
        ),
    }
    with tempfile.TemporaryDirectory(prefix="t2i-control-plane-") as tmp:
        cluster = Cluster(Path(tmp), args)
        try:
            figures["machine"]["redis"] = cluster.redis().info("server")["redis_version"]
            runs: dict[str, Any] = {}
            for count, jobs in (
                (args.baseline_workers, args.baseline_jobs),
                (args.workers, args.jobs),
            ):
                cluster.scale_to(count)
                result = await _round(cluster, args, jobs)
                result["capacity"] = _capacity(result, args)
                runs[f"workers_{count}"] = result
                print(json.dumps({f"workers_{count}": result}), file=sys.stderr)
            figures["runs"] = runs
        finally:
            cluster.stop()
    main = figures["runs"][f"workers_{args.workers}"]
    base = figures["runs"][f"workers_{args.baseline_workers}"]
    figures["summary"] = {
        key: main[key]
        for key in (
            "jobs_per_s",
            "redis_commands_per_job",
            "redis_cpu_us_per_job",
            "redis_command_usec_per_job",
            "api_cpu_ms_per_job",
        )
    } | main["capacity"]
    figures["summary"]["vs_baseline"] = {
        key: round(main[key] / base[key], 2)
        for key in (
            "jobs_per_s",
            "redis_commands_per_job",
            "redis_cpu_us_per_job",
            "api_cpu_ms_per_job",
        )
    }
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--baseline-workers", type=int, default=1)
    parser.add_argument("--jobs", type=int, default=400)
    parser.add_argument("--baseline-jobs", type=int, default=None, help="default: --jobs")
    parser.add_argument("--render-s", type=float, default=0.05, help="simulated s per image")
    parser.add_argument("--size", type=int, default=512, help="image width and height")
    parser.add_argument("--keys", type=int, default=4)
    parser.add_argument("--concurrency", type=int, default=16, help="submitting callers")
    parser.add_argument("--api-processes", type=int, default=psutil.cpu_count() or 1)
    parser.add_argument("--target-render-s", type=float, default=0.25)
    parser.add_argument("--redis-busy", type=float, default=0.7)
    parser.add_argument("--idle-s", type=float, default=5.0)
    parser.add_argument("--out", type=Path, default=RESULTS_FILE)
    parser.add_argument("--no-out", action="store_true", help="print only, write no file")
    args = parser.parse_args()
    if args.baseline_jobs is None:
        args.baseline_jobs = args.jobs
    figures = asyncio.run(run(args))
    text = json.dumps(figures, indent=2)
    print(text)
    if not args.no_out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
