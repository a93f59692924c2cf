"""A live worker announces itself in Redis, so the API can tell whether anyone will render."""

import contextlib
import json
import logging
import time

from redis import Redis
from redis.exceptions import RedisError

from shared.queue import WORKERS_KEY, worker_info_key
from worker.periodic import Periodic

log = logging.getLogger(__name__)

_FORGET_AFTER_S = 24 * 3600


class Heartbeat:
    def __init__(self, redis: Redis, worker_name: str, interval_s: float, model: str) -> None:
        self._redis = redis
        self._name = worker_name
        self._info = json.dumps({"model": model})
        self._beats = Periodic("heartbeat", interval_s, self._beat)

    def start(self) -> None:
        self._beats.start()

    def stop(self) -> None:
        self._beats.stop()
        with contextlib.suppress(RedisError):
            self._redis.zrem(WORKERS_KEY, self._name)
            self._redis.delete(worker_info_key(self._name))

    def _beat(self) -> None:
        now = time.time()
        try:
            with self._redis.pipeline(transaction=False) as pipe:
                pipe.zadd(WORKERS_KEY, {self._name: now})
                pipe.set(worker_info_key(self._name), self._info, ex=_FORGET_AFTER_S)
                pipe.zremrangebyscore(WORKERS_KEY, "-inf", now - _FORGET_AFTER_S)
                pipe.execute()
        except RedisError as exc:
            log.warning("heartbeat to Redis failed: %s", exc)
