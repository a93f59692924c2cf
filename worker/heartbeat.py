"""A live worker announces itself in Redis, so the API can tell whether anyone will render."""

import contextlib
import logging
import time

from redis import Redis
from redis.exceptions import RedisError

from shared.queue import WORKERS_KEY

log = logging.getLogger(__name__)

_FORGET_AFTER_S = 24 * 3600


class Heartbeat:
    def __init__(self, redis: Redis, worker_name: str) -> None:
        self._redis = redis
        self._name = worker_name

    def beat(self) -> None:
        now = time.time()
        try:
            with self._redis.pipeline(transaction=False) as pipe:
                pipe.zadd(WORKERS_KEY, {self._name: now})
                pipe.zremrangebyscore(WORKERS_KEY, "-inf", now - _FORGET_AFTER_S)
                pipe.execute()
        except RedisError as exc:
            log.warning("heartbeat to Redis failed: %s", exc)

    def leave(self) -> None:
        """Leave the live set at once: a stopping worker takes no more jobs."""
        with contextlib.suppress(RedisError):
            self._redis.zrem(WORKERS_KEY, self._name)
