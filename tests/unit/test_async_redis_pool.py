"""The API's async Redis client opens no more connections than T2I_REDIS_ASYNC_MAX_CONNECTIONS,
however many blocking reads (SSE, `Prefer: wait`) run at once: the rest wait for a free one."""

import asyncio
import time

from redis import Redis

from shared.redisconn import make_async_redis
from shared.settings import CoreSettings

LIMIT = 3
READERS = 12


def _our_connections(redis: Redis, name: str) -> int:
    return sum(1 for client in redis.client_list() if client.get("name") == name)


async def _blocking_reads(port: int, name: str) -> tuple[int, float]:
    settings = CoreSettings(
        redis_url=f"redis://127.0.0.1:{port}/15?client_name={name}",
        redis_async_max_connections=LIMIT,
        redis_timeout_s=10,
    )
    client = make_async_redis(settings, socket_timeout_s=5)
    watcher = Redis(port=port, db=15)
    peak = 0
    try:
        readers = [
            asyncio.create_task(client.blpop([f"pool-test:{i}"], timeout=0.5))
            for i in range(READERS)
        ]
        started = time.monotonic()
        while not all(reader.done() for reader in readers):
            peak = max(peak, await asyncio.to_thread(_our_connections, watcher, name))
            await asyncio.sleep(0.05)
        await asyncio.gather(*readers)
        return peak, time.monotonic() - started
    finally:
        await client.aclose()
        watcher.close()


def test_blocking_reads_share_a_bounded_pool(redis_client: Redis, redis_port: int) -> None:
    peak, took = asyncio.run(_blocking_reads(redis_port, "t2i-pool-test"))
    assert 0 < peak <= LIMIT, f"{peak} connections for a pool of {LIMIT}"
    # Twelve half-second reads through three connections: four rounds, not one.
    assert took >= (READERS / LIMIT) * 0.5 * 0.8, took
