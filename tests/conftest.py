"""Session-wide real services: Redis, an S3 server, and a worker + API per storage backend."""

import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest
from redis import Redis

from tests.support import Process, Stack, service_env, start_redis, start_s3_server
from worker.tiny_customization import ensure_tiny_loras
from worker.tiny_model import SECOND_TINY_MODEL_ID, ensure_second_tiny_model

FAIL_PROMPT = "fail-on-purpose"
S3_BUCKET = "txt2img-test"

# One compile cache for every session and the workers they start, instead of one per session's
# model cache: the tiny model's graphs compile from scratch once on a machine, not in every run.
os.environ.setdefault(
    "TORCHINDUCTOR_CACHE_DIR", str(Path(tempfile.gettempdir()) / "txt2img-tests-inductor")
)


@pytest.fixture(scope="session")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("services")


@pytest.fixture(scope="session")
def model_cache(workdir: Path) -> Path:
    return workdir / "models"


@pytest.fixture(scope="session")
def redis_port(workdir: Path) -> Iterator[int]:
    process, port = start_redis(workdir / "redis")
    yield port
    process.stop()


@pytest.fixture
def redis_client(redis_port: int) -> Iterator[Redis]:
    """A scratch database (15), emptied before each test."""
    client = Redis(port=redis_port, db=15)
    client.flushdb()
    yield client
    client.close()


@pytest.fixture(scope="session")
def s3_endpoint(workdir: Path) -> Iterator[str]:
    process, endpoint = start_s3_server(workdir)
    boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="test",
        aws_secret_access_key="test",
    ).create_bucket(Bucket=S3_BUCKET)
    yield endpoint
    process.stop()


def _stack_env(redis_port: int, db: int, workdir: Path, model_cache: Path, **extra: str) -> dict:
    defaults = {
        "T2I_REDIS_URL": f"redis://127.0.0.1:{redis_port}/{db}",
        "T2I_MODEL_ID": "tiny",
        "T2I_MODEL_CACHE_DIR": str(model_cache),
        "T2I_DATA_DIR": str(workdir / "data"),
        "T2I_DEBUG_FAIL_PROMPT": FAIL_PROMPT,
        "T2I_HEARTBEAT_INTERVAL_S": "1",
        "T2I_WORKER_HEARTBEAT_MAX_AGE_S": "5",
        # Lost workers and lost messages are recovered within seconds, not minutes.
        "T2I_LEASE_S": "4",
        "T2I_REAP_INTERVAL_S": "0.5",
        "T2I_REDISPATCH_AFTER_S": "3",
    }
    return service_env(**{**defaults, **extra})


def run_stack(
    name: str, db: int, redis_port: int, workdir: Path, model_cache: Path, **extra: str
) -> Iterator[Stack]:
    stack_dir = workdir / name
    stack_dir.mkdir()
    with_worker = extra.pop("with_worker", "yes") == "yes"
    with_webhooks = extra.pop("with_webhooks", "no") == "yes"
    env = _stack_env(redis_port, db, stack_dir, model_cache, **extra)
    stack = Stack(env, stack_dir, with_worker=with_worker, with_webhooks=with_webhooks).start()
    yield stack
    stack.stop()


def start_second_model_worker(stack: Stack, model_cache: Path) -> Process:
    """A worker beside `stack`'s serving the second tiny model, from its single-file checkpoint,
    under the name requests route by."""
    checkpoint = ensure_second_tiny_model(model_cache).with_suffix(".safetensors")
    return Process(
        "second-worker",
        [sys.executable, "-m", "worker"],
        {
            **stack.env,
            "T2I_MODEL_ID": str(checkpoint),
            "T2I_MODEL_NAME": SECOND_TINY_MODEL_ID,
            "T2I_DEFAULT_MODEL": "tiny",
            # Its configs and safety checker: the tiny model's, the same shape.
            "T2I_SINGLE_FILE_CONFIG": "tiny",
        },
        stack.workdir / "second-worker.log",
    ).start()


@pytest.fixture(scope="session")
def local_stack(redis_port: int, workdir: Path, model_cache: Path) -> Iterator[Stack]:
    yield from run_stack("local-stack", 0, redis_port, workdir, model_cache)


@pytest.fixture(scope="session")
def s3_stack(
    redis_port: int, workdir: Path, model_cache: Path, s3_endpoint: str
) -> Iterator[Stack]:
    yield from run_stack(
        "s3-stack",
        1,
        redis_port,
        workdir,
        model_cache,
        T2I_STORAGE="s3",
        T2I_S3_ENDPOINT_URL=s3_endpoint,
        T2I_S3_BUCKET=S3_BUCKET,
        T2I_S3_ACCESS_KEY_ID="test",
        T2I_S3_SECRET_ACCESS_KEY="test",
    )


@pytest.fixture(scope="session")
def serial_stack(redis_port: int, workdir: Path, model_cache: Path) -> Iterator[Stack]:
    """A worker that takes one job at a time, so the queue behind it is predictable; the OpenAI
    and A1111 routes wait two seconds for their job."""
    yield from run_stack(
        "serial-stack",
        2,
        redis_port,
        workdir,
        model_cache,
        T2I_CONCURRENCY="1",
        T2I_SYNC_WAIT_S="2",
    )


@pytest.fixture(scope="session")
def workerless_api(redis_port: int, workdir: Path, model_cache: Path) -> Iterator[Stack]:
    """An API with no worker behind it: jobs wait until they expire."""
    yield from run_stack(
        "workerless",
        3,
        redis_port,
        workdir,
        model_cache,
        with_worker="no",
        T2I_QUEUE_TIMEOUT_S="1",
        T2I_SWEEP_INTERVAL_S="0.3",
        T2I_MAX_QUEUE_DEPTH="3",
    )


@pytest.fixture(scope="session")
def short_retention_stack(redis_port: int, workdir: Path, model_cache: Path) -> Iterator[Stack]:
    """Jobs and their images live ten seconds: long enough for a fresh worker's first render on a
    loaded machine (seconds), short enough to watch them go."""
    yield from run_stack(
        "short-retention",
        4,
        redis_port,
        workdir,
        model_cache,
        T2I_RETENTION_S="10",
        T2I_SWEEP_INTERVAL_S="0.3",
    )


@pytest.fixture(scope="session")
def webhook_stack(redis_port: int, workdir: Path, model_cache: Path) -> Iterator[Stack]:
    """A render worker, a webhook worker allowed to call loopback, and quick retries."""
    yield from run_stack(
        "webhook-stack",
        5,
        redis_port,
        workdir,
        model_cache,
        with_webhooks="yes",
        T2I_WEBHOOK_ALLOWLIST="127.0.0.1",
        T2I_WEBHOOK_RETRY_DELAYS_S="0.3,0.6,1.2",
    )


@pytest.fixture(scope="session")
def batching_stack(redis_port: int, workdir: Path, model_cache: Path) -> Iterator[Stack]:
    """A worker that waits long enough for a burst of requests to gather into batches."""
    yield from run_stack(
        "batching-stack", 7, redis_port, workdir, model_cache, T2I_BATCH_WAIT_MS="400"
    )


@pytest.fixture(scope="session")
def tiny_lora_dir(model_cache: Path) -> Path:
    """A LoRA registry with the tiny adapters."""
    return ensure_tiny_loras(model_cache)


@pytest.fixture(scope="session")
def customization_stack(
    redis_port: int, workdir: Path, model_cache: Path, tiny_lora_dir: Path
) -> Iterator[Stack]:
    """A worker with the tiny LoRA registry and the tiny canny ControlNet."""
    yield from run_stack(
        "customization-stack",
        12,
        redis_port,
        workdir,
        model_cache,
        T2I_LORA_DIR=str(tiny_lora_dir),
        T2I_CONTROLNETS='{"canny": "tiny"}',
    )


@pytest.fixture(params=["local", "s3"])
def any_stack(request: pytest.FixtureRequest) -> Stack:
    """Each storage backend in turn."""
    return request.getfixturevalue(f"{request.param}_stack")
