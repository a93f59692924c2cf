"""Session-wide real services: Redis, an S3 server, and a worker + API per storage backend."""

from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest
from redis import Redis

from tests.support import Stack, service_env, start_redis, start_s3_server

FAIL_PROMPT = "fail-on-purpose"
S3_BUCKET = "txt2img-test"


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
    return service_env(
        T2I_REDIS_URL=f"redis://127.0.0.1:{redis_port}/{db}",
        T2I_MODEL_ID="tiny",
        T2I_MODEL_CACHE_DIR=str(model_cache),
        T2I_DATA_DIR=str(workdir / "data"),
        T2I_DEBUG_FAIL_PROMPT=FAIL_PROMPT,
        T2I_HEARTBEAT_INTERVAL_S="1",
        T2I_WORKER_HEARTBEAT_MAX_AGE_S="5",
        **extra,
    )


@pytest.fixture(scope="session")
def local_stack(redis_port: int, workdir: Path, model_cache: Path) -> Iterator[Stack]:
    stack_dir = workdir / "local-stack"
    stack_dir.mkdir()
    stack = Stack(_stack_env(redis_port, 0, stack_dir, model_cache), stack_dir).start()
    yield stack
    stack.stop()


@pytest.fixture(scope="session")
def s3_stack(
    redis_port: int, workdir: Path, model_cache: Path, s3_endpoint: str
) -> Iterator[Stack]:
    stack_dir = workdir / "s3-stack"
    stack_dir.mkdir()
    env = _stack_env(
        redis_port,
        1,
        stack_dir,
        model_cache,
        T2I_STORAGE="s3",
        T2I_S3_ENDPOINT_URL=s3_endpoint,
        T2I_S3_BUCKET=S3_BUCKET,
        T2I_S3_ACCESS_KEY_ID="test",
        T2I_S3_SECRET_ACCESS_KEY="test",
    )
    stack = Stack(env, stack_dir).start()
    yield stack
    stack.stop()


@pytest.fixture(params=["local", "s3"])
def any_stack(request: pytest.FixtureRequest) -> Stack:
    """Each storage backend in turn."""
    return request.getfixturevalue(f"{request.param}_stack")
