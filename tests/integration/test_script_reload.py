"""Redis forgetting its scripts (a restart, a failover, SCRIPT FLUSH) fails no request."""

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
from redis.asyncio import Redis as AsyncRedis

from shared.asyncstore import AsyncJobStore
from shared.jobscripts import RateLimit
from shared.records import request_fingerprint
from tests.support import queued_record, start_redis


@pytest.fixture
def redis_port(tmp_path: Path) -> Iterator[int]:
    """A server of its own: flushing the scripts of the session's one would disturb others."""
    process, port = start_redis(tmp_path / "redis")
    yield port
    process.stop()


def test_concurrent_creates_and_reads_succeed_while_the_scripts_are_flushed(
    redis_port: int,
) -> None:
    async def scenario() -> None:
        store = AsyncJobStore(AsyncRedis(port=redis_port), 3600, worker_max_age_s=30)
        flusher = AsyncRedis(port=redis_port)
        done = asyncio.Event()
        flushes = 0

        async def flush_until_done() -> None:
            nonlocal flushes
            while not done.is_set():
                await flusher.script_flush()
                flushes += 1
                await asyncio.sleep(0)

        async def create(owner: str) -> None:
            record = queued_record(owner)
            created, view = await store.create(
                record,
                None,
                request_fingerprint(record.request),
                10_000,
                "renders",
                RateLimit(owner, per_minute=10_000),
            )
            assert created.created
            assert view is not None and view.record.id == record.id
            assert view.position is not None
            read = await store.read(record.id)
            assert read is not None and read.position is not None
            assert (await store.positions([record.id]))[0] is not None

        flushing = asyncio.create_task(flush_until_done())
        try:
            for _ in range(4):
                owners = [f"{index:012x}" for index in range(50)]
                await asyncio.gather(*(create(owner) for owner in owners))
        finally:
            done.set()
            await flushing
        assert flushes > 4

    asyncio.run(scenario())
