"""Connections to Redis for every process: one server at T2I_REDIS_URL, or the primary that Redis
Sentinel names, followed across a failover; and how a write is made to outlive one."""

from typing import Any
from urllib.parse import quote

from redis import Redis
from redis.asyncio import BlockingConnectionPool
from redis.asyncio import Redis as AsyncRedis
from redis.asyncio.sentinel import Sentinel as AsyncSentinel
from redis.asyncio.sentinel import SentinelConnectionPool
from redis.asyncio.sentinel import SentinelManagedConnection as AsyncSentinelManagedConnection
from redis.connection import parse_url
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.sentinel import Sentinel, SentinelManagedConnection

from shared.settings import CoreSettings


class NotReplicated(RedisError):
    """Fewer replicas than T2I_REDIS_REPLICA_ACKS confirmed a write in time: a failover now could
    lose it."""


class NotPrimary(RedisConnectionError):
    """The server a sentinel named as the primary answers ROLE as a replica: that sentinel has
    not yet learned of a failover. A ConnectionError, so the caller retries (the API: a `503`)."""


def _check_role(reply: Any, host: str, port: int) -> None:
    role = reply[0].decode() if isinstance(reply[0], bytes) else str(reply[0])
    if role != "master":
        raise NotPrimary(f"{host}:{port}, named the primary by Sentinel, is a {role}")


class _PrimaryConnection(SentinelManagedConnection):
    """A connection to the primary that asks the server its ROLE on connecting, as Sentinel's
    client guidelines ask: a lagging sentinel can still name the old primary, back as an empty
    replica of the new one, whose reads would answer a valid key `401` or a live job `404`. Once
    per connection is enough: Sentinel closes a server's client connections when it demotes it."""

    def connect_to(self, address: tuple[str, int]) -> None:
        super().connect_to(address)
        try:
            self.send_command("ROLE")
            _check_role(self.read_response(), self.host, self.port)
        except BaseException:
            self.disconnect()
            raise


class _AsyncPrimaryConnection(AsyncSentinelManagedConnection):
    """`_PrimaryConnection`, for the event loop."""

    async def connect_to(self, address: tuple[str, int]) -> None:
        await super().connect_to(address)
        try:
            await self.send_command("ROLE")
            _check_role(await self.read_response(), self.host, self.port)
        except BaseException:
            await self.disconnect()
            raise


def _server_kwargs(settings: CoreSettings, socket_timeout_s: float) -> dict[str, Any]:
    """What a connection to the primary needs besides its address: the database and credentials
    of T2I_REDIS_URL, and the timeouts."""
    parsed = parse_url(settings.redis_url)
    return {
        "db": parsed.get("db", 0),
        "username": parsed.get("username"),
        "password": parsed.get("password"),
        "socket_connect_timeout": settings.redis_timeout_s,
        "socket_timeout": socket_timeout_s,
    }


def _sentinel_kwargs(settings: CoreSettings) -> dict[str, Any]:
    return {
        "password": settings.redis_sentinel_password,
        "socket_connect_timeout": settings.redis_timeout_s,
        "socket_timeout": settings.redis_timeout_s,
    }


def make_redis(settings: CoreSettings) -> Redis:
    if not settings.redis_sentinels:
        return Redis.from_url(
            settings.redis_url,
            socket_connect_timeout=settings.redis_timeout_s,
            socket_timeout=settings.redis_timeout_s,
            health_check_interval=30,
        )
    sentinel = Sentinel(settings.sentinel_addresses, sentinel_kwargs=_sentinel_kwargs(settings))
    return sentinel.master_for(
        settings.redis_sentinel_master,
        redis_class=Redis,
        connection_class=_PrimaryConnection,
        health_check_interval=30,
        **_server_kwargs(settings, settings.redis_timeout_s),
    )


class _BlockingSentinelPool(SentinelConnectionPool, BlockingConnectionPool):
    """The primary that Sentinel names, through a pool that waits for a free connection."""


def make_async_redis(settings: CoreSettings, socket_timeout_s: float) -> AsyncRedis:
    """A client whose pool holds at most T2I_REDIS_ASYNC_MAX_CONNECTIONS connections: a caller
    that finds none free waits up to T2I_REDIS_TIMEOUT_S, then gets a ConnectionError (a `503`),
    so a crowd of blocking reads cannot open connections without bound."""
    limits = {
        "max_connections": settings.redis_async_max_connections,
        "timeout": settings.redis_timeout_s,
    }
    if not settings.redis_sentinels:
        pool = BlockingConnectionPool.from_url(
            settings.redis_url,
            socket_connect_timeout=settings.redis_timeout_s,
            socket_timeout=socket_timeout_s,
            **limits,
        )
        return AsyncRedis.from_pool(pool)
    sentinel = AsyncSentinel(
        settings.sentinel_addresses, sentinel_kwargs=_sentinel_kwargs(settings)
    )
    return sentinel.master_for(
        settings.redis_sentinel_master,
        redis_class=AsyncRedis,
        connection_pool_class=_BlockingSentinelPool,
        connection_class=_AsyncPrimaryConnection,
        **limits,
        **_server_kwargs(settings, socket_timeout_s),
    )


def broker_url(settings: CoreSettings) -> str:
    """Celery's broker: T2I_REDIS_URL itself, or kombu's `sentinel://` list carrying its
    credentials and database."""
    if not settings.redis_sentinels:
        return settings.redis_url
    parsed = parse_url(settings.redis_url)
    username, password = parsed.get("username"), parsed.get("password")
    credentials = ""
    if username or password:
        credentials = f"{quote(username or '', safe='')}:{quote(password or '', safe='')}@"
    db = parsed.get("db", 0)
    return ";".join(
        f"sentinel://{credentials}{host}:{port}/{db}" for host, port in settings.sentinel_addresses
    )


def broker_sentinel_options(settings: CoreSettings) -> dict[str, Any]:
    """The transport options kombu's sentinel transport needs; none without sentinels."""
    if not settings.redis_sentinels:
        return {}
    return {
        "master_name": settings.redis_sentinel_master,
        "sentinel_kwargs": _sentinel_kwargs(settings),
    }


def wait_args(settings: CoreSettings) -> tuple[int, int] | None:
    """The arguments of the WAIT that follows a new job; None when replication is left
    asynchronous."""
    return _wait_for(settings.redis_replica_acks or 0, settings)


def end_wait_args(settings: CoreSettings) -> tuple[int, int] | None:
    """The arguments of the WAIT that follows a job's end. Under Sentinel it waits for a replica
    unless the operator chose otherwise: an end the promoted replica lacks is rendered again,
    and its first images and `completed` webhook were already out."""
    acks = settings.redis_replica_acks
    if acks is None:
        acks = 1 if settings.redis_sentinels else 0
    return _wait_for(acks, settings)


def _wait_for(acks: int, settings: CoreSettings) -> tuple[int, int] | None:
    if acks == 0:
        return None
    return acks, max(1, round(settings.redis_replica_ack_timeout_s * 1000))
