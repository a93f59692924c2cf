"""Under Sentinel, a process reads only from a server that says it is the primary: a sentinel
that has not yet learned of a failover can name the old primary, back as an empty replica of the
new one, and a read there would answer a valid key `401` or a live job `404`. A server that
answers ROLE as a replica is an outage (`503`, retryable) until a sentinel names the primary."""

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from redis import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from starlette.requests import Request

from api.errors import as_service_error
from shared.apikeys import ApiKeyStore, CachedKeys
from shared.redisconn import make_async_redis, make_redis
from shared.settings import CoreSettings
from tests.support import Process, free_port, start_redis


class NamedPrimary:
    """Stands in for the sentinels' answer: the address they name as the primary."""

    def __init__(self, port: int) -> None:
        self.port = port

    def sync(self, service_name: str) -> tuple[str, int]:
        return "127.0.0.1", self.port

    async def of_loop(self, service_name: str) -> tuple[str, int]:
        return "127.0.0.1", self.port


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[tuple[int, int]]:
    """A primary and an empty replica (its own primary unreachable, so it never syncs), each a
    redis-server of its own: the session server's databases are all taken."""
    started: list[Process] = []
    try:
        process, primary = start_redis(tmp_path / "primary")
        started.append(process)
        process, replica = start_redis(tmp_path / "replica", replica_of=free_port())
        started.append(process)
        yield primary, replica
    finally:
        for process in started:
            process.stop()


def _settings(primary: int) -> CoreSettings:
    # No sentinel listens there: each client's discover_master is replaced by a NamedPrimary.
    return CoreSettings(
        redis_url=f"redis://127.0.0.1:{primary}/0",
        redis_sentinels=f"127.0.0.1:{free_port()}",
        redis_timeout_s=1,
    )


def _as_answer(exc: Exception) -> int:
    request = Request({"type": "http", "method": "GET", "path": "/v1/jobs", "headers": []})
    return as_service_error(request, exc).status_code


def test_a_valid_key_read_from_a_replica_is_a_503_not_a_401(
    servers: tuple[int, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    primary, replica = servers
    key, plain = ApiKeyStore(Redis(port=primary)).create("roles", 60)
    assert Redis(port=replica).hgetall(f"t2i:apikey:{key.id}") == {}
    named = NamedPrimary(replica)

    async def authenticate() -> Any:
        client = make_async_redis(_settings(primary), socket_timeout_s=1)
        sentinels = client.connection_pool.sentinel_manager
        monkeypatch.setattr(sentinels, "discover_master", named.of_loop)
        keys = CachedKeys(client, ttl_s=0)
        try:
            with pytest.raises(RedisConnectionError) as raised:
                await keys.authenticate(plain)
            named.port = primary
            return raised.value, await keys.authenticate(plain)
        finally:
            await client.aclose()

    refused, found = asyncio.run(authenticate())
    assert _as_answer(refused) == 503
    assert found == key


def test_the_sync_client_reads_no_replica_either(
    servers: tuple[int, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    primary, replica = servers
    key, _ = ApiKeyStore(Redis(port=primary)).create("roles", 60)
    named = NamedPrimary(replica)
    client = make_redis(_settings(primary))
    monkeypatch.setattr(client.connection_pool.sentinel_manager, "discover_master", named.sync)
    try:
        with pytest.raises(RedisConnectionError) as raised:
            ApiKeyStore(client).get(key.id)
        assert _as_answer(raised.value) == 503
        named.port = primary
        assert ApiKeyStore(client).get(key.id) == key
    finally:
        client.close()
