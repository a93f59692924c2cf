"""The whole service on one GPU, beside the bare executor in the same run.

`python -m bench.gpu_service` on a CUDA machine first times the bare executor (bench.gpu_pipeline's
`ours`: concurrent jobs straight into worker.executor.GpuExecutor) in a child process, then starts
redis-server, the API and one GPU worker on the same model and levers, and drives it with
concurrent HTTP clients, each submitting a job and waiting for it: images/s end to end, latency
per job, and the CPU the API, the worker and Redis spent per job. `service_efficiency` is the
service's images/s at the first client count over the bare executor's. The JSON goes to stdout
and bench/results/<date>-<gpu>-service.json, rewritten after each phase. `--smoke` runs it all on
a CPU with the tiny model, to prove it executes.
"""

import argparse
import asyncio
import datetime
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import diffusers
import httpx
import psutil
import torch
from redis import Redis

from bench.assets import DEFAULT_CACHE_DIR, GUIDANCE, PROMPT, build_sd15
from bench.gpu_pipeline import (
    RESULTS_DIR,
    SWITCHED_LEVERS,
    add_worker_options,
    child_options,
    gpu_name,
    levers_for,
    load_ours,
    note,
    ours,
    slug,
    startup_phases,
)
from bench.service import tree_cpu_s
from shared.apikeys import ApiKeyStore
from shared.queue import WORKERS_KEY
from tests.support import (
    REPO_ROOT,
    Process,
    api_answers,
    free_port,
    service_env,
    start_redis,
    wait_until,
)
from worker.pipeline import compiled_image_counts
from worker.tiny_model import ensure_tiny_model

# Where bench/gpu_wheels.sh unpacks the redis-server it carries to a machine without one.
CARRIED_REDIS = REPO_ROOT / ".whl" / "bin" / "redis-server"
TERMINAL = {"succeeded", "failed", "canceled", "expired"}
# The API holds a `Prefer: wait` answer at most this long; a job still running then is polled.
WAIT_S = 60
POLL_S = 0.25


def redis_server() -> Path:
    """The redis-server to run: `T2I_REDIS_SERVER`, else the one on PATH, else the carried one."""
    named = os.environ.get("T2I_REDIS_SERVER")
    on_path = shutil.which("redis-server")
    if CARRIED_REDIS.is_file() and not os.access(CARRIED_REDIS, os.X_OK):
        # A copy to another machine may lose the file's mode.
        CARRIED_REDIS.chmod(0o755)
    for candidate in (named, on_path, str(CARRIED_REDIS)):
        if candidate and os.access(candidate, os.X_OK):
            # Not resolved: Debian's redis-server is a link whose name tells the binary its role.
            return Path(candidate).absolute()
    raise SystemExit(
        "no redis-server: set T2I_REDIS_SERVER, put one on PATH, or run bench/gpu_wheels.sh"
    )


def put_on_path(server: Path, workdir: Path) -> None:
    """tests.support.start_redis runs `redis-server` from PATH: make it this one."""
    bin_dir = workdir / "bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    (bin_dir / "redis-server").symlink_to(server)
    os.environ["PATH"] = f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"


class Stack:
    """redis-server, the API and one worker on loopback, local storage in `workdir`."""

    def __init__(self, workdir: Path, api_processes: int, env: dict[str, str]) -> None:
        self.redis_process, redis_port = start_redis(workdir / "redis")
        self.redis = Redis(port=redis_port)
        self.base_url = f"http://127.0.0.1:{free_port()}"
        self.env = service_env(
            T2I_REDIS_URL=f"redis://127.0.0.1:{redis_port}/0",
            T2I_PORT=self.base_url.rsplit(":", 1)[1],
            T2I_API_PROCESSES=str(api_processes),
            T2I_DATA_DIR=str(workdir / "data"),
            T2I_MAX_QUEUE_DEPTH="1000000",
            **env,
        )
        self.api_key = ApiKeyStore(self.redis).create("bench", 10**9)[1]
        self.api = Process("api", [sys.executable, "-m", "api"], self.env, workdir / "api.log")
        self.worker = Process(
            "worker", [sys.executable, "-m", "worker"], self.env, workdir / "worker.log"
        )

    def start(self, worker_timeout_s: float) -> None:
        """The API and the worker start side by side; this returns once both take requests."""
        self.api.start()
        self.worker.start()
        try:
            wait_until(lambda: api_answers(self.api, self.base_url), 60, "the API")
        except TimeoutError as exc:
            # uvicorn's parent outlives processes that die at import: their errors are here.
            raise RuntimeError(f"{exc}:\n{self.api.log_tail()}") from exc

        def ready() -> bool:
            if not self.worker.alive():
                raise RuntimeError(f"the worker exited:\n{self.worker.log_tail()}")
            return bool(self.redis.zcard(WORKERS_KEY))

        wait_until(ready, worker_timeout_s, "the worker")

    def redis_cpu_s(self) -> float:
        cpu = self.redis.info("cpu")
        return float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])

    def stop(self) -> None:
        for process in (self.api, self.worker, self.redis_process):
            process.stop()


def _percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def bare_executor(model_dir: Path, args: argparse.Namespace) -> dict[str, Any]:
    """bench.gpu_pipeline's `ours` in a child process, whose exit frees every byte of GPU memory
    (compiled graphs and their memory pools included) before the worker loads."""
    command = [sys.executable, "-m", "bench.gpu_service", "--bare-child", *child_options(args)]
    command += ["--model-dir", str(model_dir), "--steps", str(args.steps)]
    command += ["--jobs", str(args.jobs), "--repeats", str(args.repeats)]
    command += ["--batch-wait-ms", str(args.batch_wait_ms)]
    finished = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=False)
    lines = [line for line in finished.stdout.splitlines() if line.startswith("{")]
    if finished.returncode != 0 or not lines:
        raise RuntimeError(f"the bare executor's process failed (exit {finished.returncode})")
    return json.loads(lines[-1])


def bare_child(args: argparse.Namespace) -> int:
    """Load and warm up as the worker does, then `ours`; one JSON line on stdout."""
    device = torch.device(args.device)
    started = time.perf_counter()
    renderer, executor = load_ours(args.model_dir, args)
    executor.wait_fully_warm()
    figures: dict[str, Any] = {
        "gpu": gpu_name(device),
        "levers": asdict(levers_for(args)),
        "load_and_warm_up_s": round(time.perf_counter() - started, 2),
        "load_and_warm_up_phases_s": startup_phases(renderer),
    }
    try:
        figures.update(ours(executor, args))
    finally:
        executor.shutdown()
    if device.type == "cuda":
        figures["peak_vram_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    print(json.dumps(figures), flush=True)
    return 0


def worker_env(args: argparse.Namespace, model_id: str) -> dict[str, str]:
    """The worker's settings: the bare executor's model, device, batching and levers (unset
    levers take the same per-device defaults on both sides)."""
    env = {
        "T2I_MODEL_ID": model_id,
        "T2I_MODEL_CACHE_DIR": str(args.cache_dir),
        "T2I_DEVICE": args.device,
        "T2I_STORAGE": "local",
        "T2I_MAX_BATCH_IMAGES": str(args.max_batch_images),
        "T2I_MAX_BATCH_PIXELS": str(args.max_batch_pixels),
        "T2I_BATCH_WAIT_MS": str(args.batch_wait_ms),
        "T2I_PROVENANCE": str(args.provenance).lower(),
        "T2I_SAFETY_CHECKER": str(args.safety_checker).lower(),
        "T2I_HEARTBEAT_INTERVAL_S": "1",
    }
    if args.compiled_counts:
        env["T2I_COMPILED_IMAGE_COUNTS"] = json.dumps(args.compiled_counts)
    for name in SWITCHED_LEVERS:
        value = getattr(args, name)
        if value is not None:
            env[f"T2I_{name.upper()}"] = str(value).lower()
    if args.unet_quant is not None:
        env["T2I_UNET_QUANT"] = args.unet_quant
    env["T2I_DEEPCACHE_INTERVAL"] = str(args.deepcache_interval)
    return env


def job_body(args: argparse.Namespace, seed: int) -> dict[str, Any]:
    """The bare executor's job (gpu_pipeline.job_batch) as a request."""
    return {
        "prompt": PROMPT,
        "width": args.size,
        "height": args.size,
        "num_inference_steps": args.steps,
        "guidance_scale": GUIDANCE,
        "scheduler": "dpmpp_2m",
        "seed": seed,
    }


async def submit_and_wait(
    client: httpx.AsyncClient, body: dict[str, Any]
) -> tuple[float, dict[str, Any]]:
    """One job as a client runs it: POST with `Prefer: wait`, polling only if that ran out."""
    started = time.perf_counter()
    response = await client.post("/v1/jobs", json=body, headers={"Prefer": f"wait={WAIT_S}"})
    if response.status_code >= 300:
        raise RuntimeError(f"POST /v1/jobs: {response.status_code} {response.text}")
    job = response.json()
    while job["status"] not in TERMINAL:
        await asyncio.sleep(POLL_S)
        job = (await client.get(f"/v1/jobs/{job['id']}")).raise_for_status().json()
    elapsed = time.perf_counter() - started
    if job["status"] != "succeeded":
        raise RuntimeError(f"a job ended {job['status']}: {job.get('error')}")
    return elapsed, job


async def one_round(
    client: httpx.AsyncClient, args: argparse.Namespace, clients: int, first_seed: int
) -> tuple[float, list[tuple[float, dict[str, Any]]]]:
    """Every client submits one job at once and waits for it: wall time and each job's answer."""
    started = time.perf_counter()
    jobs = await asyncio.gather(
        *(submit_and_wait(client, job_body(args, first_seed + n)) for n in range(clients))
    )
    return time.perf_counter() - started, list(jobs)


async def drive(stack: Stack, args: argparse.Namespace, clients: int) -> dict[str, Any]:
    """One untimed round, then `args.rounds` timed ones, at `clients` concurrent clients."""
    api, worker = stack.api.popen, stack.worker.popen
    assert api is not None and worker is not None
    async with httpx.AsyncClient(
        base_url=stack.base_url,
        headers={"Authorization": f"Bearer {stack.api_key}"},
        timeout=WAIT_S + 30,
        limits=httpx.Limits(max_connections=clients, max_keepalive_connections=clients),
    ) as client:
        # Connections (client to API, API to Redis) open and every batch size of the round runs.
        await one_round(client, args, clients, 0)
        api_before = tree_cpu_s(api.pid)
        worker_before = tree_cpu_s(worker.pid)
        redis_before = stack.redis_cpu_s()
        own_before = time.process_time()
        walls: list[float] = []
        jobs: list[tuple[float, dict[str, Any]]] = []
        for index in range(args.rounds):
            wall, answers = await one_round(client, args, clients, (index + 1) * clients)
            walls.append(wall)
            jobs += answers
        own_cpu = time.process_time() - own_before
        api_cpu = tree_cpu_s(api.pid) - api_before
        worker_cpu = tree_cpu_s(worker.pid) - worker_before
        redis_cpu = stack.redis_cpu_s() - redis_before
    count = len(jobs)
    latencies = [elapsed for elapsed, _ in jobs]
    timings = [job["timings"] for _, job in jobs]
    batches = {job["batch"]["id"]: job["batch"]["images"] for _, job in jobs}

    def median_of(name: str) -> float:
        return round(statistics.median(t[name] for t in timings if t.get(name) is not None), 3)

    return {
        "clients": clients,
        "jobs": count,
        "images_per_s": round(count / sum(walls), 3),
        "rounds_images_per_s": [round(clients / wall, 3) for wall in walls],
        "latency_p50_s": round(statistics.median(latencies), 3),
        "latency_p95_s": round(_percentile(latencies, 0.95), 3),
        # Where a job's time went, from its record: waiting for the device, the pipeline call
        # it shared, encoding and storing its image.
        "queued_p50_s": median_of("queued_s"),
        "render_p50_s": median_of("render_s"),
        "upload_p50_s": median_of("upload_s"),
        "pipeline_calls": len(batches),
        "mean_batch_images": round(statistics.mean(batches.values()), 2),
        "api_cpu_ms_per_job": round(api_cpu / count * 1000, 3),
        "worker_cpu_ms_per_job": round(worker_cpu / count * 1000, 3),
        "redis_cpu_ms_per_job": round(redis_cpu / count * 1000, 3),
        "load_generator_cpu_ms_per_job": round(own_cpu / count * 1000, 3),
    }


async def service(
    args: argparse.Namespace, model_id: str, figures: dict[str, Any], save: Callable[[], None]
) -> None:
    """Redis, the API and one worker, then each client count in turn."""
    with tempfile.TemporaryDirectory(prefix="t2i-gpu-service-") as workdir:
        put_on_path(redis_server(), Path(workdir))
        stack = Stack(Path(workdir), args.api_processes, worker_env(args, model_id))
        try:
            section: dict[str, Any] = {"redis_version": stack.redis.info("server")["redis_version"]}
            figures["service"] = section
            started = time.perf_counter()
            stack.start(args.worker_timeout_s)
            section["worker_start_s"] = round(time.perf_counter() - started, 2)
            info = httpx.get(f"{stack.base_url}/info", timeout=10).json()
            section["worker"] = {
                name: info["workers"][0].get(name) for name in ("device", "levers", "dtypes")
            }
            note(f"service: worker ready in {section['worker_start_s']} s")
            save()
            # The counts the warm-up left for idle time render now, not in a timed round.
            await asyncio.sleep(args.settle_s)
            for clients in args.clients:
                measured = await drive(stack, args, clients)
                section[f"c{clients}"] = measured
                note(
                    f"service: {measured['images_per_s']} images/s with {clients} clients, "
                    f"p50 {measured['latency_p50_s']} s"
                )
                if clients == args.clients[0]:
                    bare = figures["bare_executor"]["ours_throughput_images_per_s"]
                    figures["service_efficiency"] = round(measured["images_per_s"] / bare, 3)
                save()
        finally:
            stack.stop()
            if args.logs is not None:
                # One file: the device tool brings back only a few.
                with args.logs.open("w") as logs:
                    for process in (stack.api, stack.worker):
                        if process.log_path.exists():
                            logs.write(f"==== {process.name}\n{process.log_path.read_text()}")


def config(args: argparse.Namespace, model_id: str) -> dict[str, Any]:
    return {
        "model": "tiny" if args.smoke else "SD 1.5 architecture, random weights",
        "model_id": model_id,
        "device": args.device,
        "size": args.size,
        "steps": args.steps,
        "scheduler": "dpmpp_2m",
        "output_format": "png",
        "clients": args.clients,
        "rounds": args.rounds,
        "bare_executor_jobs": args.jobs,
        "max_batch_images": args.max_batch_images,
        "compiled_counts": args.compiled_counts or compiled_image_counts(args.max_batch_images),
        "batch_wait_ms": args.batch_wait_ms,
        "api_processes": args.api_processes,
        "storage": "local",
        # Watermark and C2PA manifest per image; off, the service does less than in production.
        "provenance": args.provenance,
        # The model directory's own checker: the tiny one, also in the SD 1.5-shaped model.
        "safety_checker": args.safety_checker,
        "settle_s": args.settle_s,
        "smoke": args.smoke,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
    }


def main() -> int:
    args = parse_args()
    if args.bare_child:
        return bare_child(args)
    # A timeout's SIGTERM unwinds like an error: the services stop and their logs are kept.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.smoke:
        model_dir = ensure_tiny_model(args.cache_dir)
        model_id = "tiny"
    else:
        model_dir = build_sd15(args.model_dir, args.cache_dir)
        model_id = str(model_dir)
    note(f"model ready in {model_dir}")
    figures: dict[str, Any] = {"gpu": None, "config": config(args, model_id)}
    out = args.out

    def save() -> None:
        """Written after every phase, so a run cut short keeps what it measured."""
        nonlocal out
        if out is None and not args.smoke and figures["gpu"]:
            today = datetime.date.today()
            out = RESULTS_DIR / f"{today}-{slug(figures['gpu'])}-service.json"
        if out is not None:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(figures, indent=2) + "\n")

    bare = bare_executor(model_dir, args)
    figures["gpu"] = bare.pop("gpu")
    figures["config"]["levers"] = bare.pop("levers")
    figures["bare_executor"] = bare
    note(f"bare executor: {bare['ours_throughput_images_per_s']:.2f} images/s")
    save()
    asyncio.run(service(args, model_id, figures, save))
    figures["load_average_1m"] = round(psutil.getloadavg()[0], 2)
    figures["finished_at"] = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    save()
    print(json.dumps(figures, indent=2))
    if out is not None:
        print(f"wrote {out}", file=sys.stderr)
    return 0


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--smoke", action="store_true", help="tiny model on a CPU, seconds")
    parser.add_argument("--device", default=None, help="default: cuda, or cpu with --smoke")
    parser.add_argument("--size", type=int, default=None, help="width and height (512)")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (25)")
    parser.add_argument(
        "--clients",
        type=lambda text: [int(n) for n in text.split(",")],
        default=None,
        help="concurrent HTTP clients, one level after another (32,128); the first is compared "
        "with the bare executor",
    )
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds per level (3)")
    parser.add_argument(
        "--jobs", type=int, default=None, help="the bare executor's concurrent jobs (32)"
    )
    parser.add_argument("--repeats", type=int, default=None, help="its one-job timings (5)")
    parser.add_argument("--api-processes", type=int, default=2)
    parser.add_argument("--settle-s", type=float, default=None, help="idle after start (15)")
    parser.add_argument("--worker-timeout-s", type=float, default=600, help="its start, at most")
    parser.add_argument("--provenance", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--safety-checker", action=argparse.BooleanOptionalAction, default=True)
    add_worker_options(parser)
    parser.add_argument("--cache-dir", type=Path, default=None, help="models, compile cache")
    parser.add_argument("--model-dir", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=None, help="where to write the JSON")
    parser.add_argument(
        "--logs", type=Path, default=None, help="a file for the API's and the worker's logs"
    )
    parser.add_argument("--bare-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    # Smoke figures are seconds on a CPU: the tiny model at the API's smallest size, 2 steps.
    smoke = {"size": 256, "steps": 2, "clients": [4, 8], "rounds": 1, "repeats": 1, "settle_s": 0}
    full = {
        "size": 512,
        "steps": 25,
        "clients": [32, 128],
        "rounds": 3,
        "repeats": 5,
        "settle_s": 15,
    }
    for name, value in (smoke if args.smoke else full).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.jobs is None:
        args.jobs = args.clients[0]
    args.device = args.device or ("cpu" if args.smoke else "cuda")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("no CUDA device here: run with --smoke for the CPU smoke test")
    args.cache_dir = args.cache_dir or DEFAULT_CACHE_DIR
    args.model_dir = args.model_dir or args.cache_dir / "sd15-random"
    return args


if __name__ == "__main__":
    sys.exit(main())
