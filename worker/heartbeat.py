"""A live worker announces itself in Redis, so the API can tell whether anyone will render."""

import contextlib
import logging
import threading
import time

from redis import Redis
from redis.exceptions import RedisError

from shared.queue import WORKERS_KEY

log = logging.getLogger(__name__)

_FORGET_AFTER_S = 24 * 3600


class Heartbeat:
    def __init__(self, redis: Redis, worker_name: str, interval_s: float) -> None:
        self._redis = redis
        self._name = worker_name
        self._interval_s = interval_s
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join(timeout=self._interval_s)
        with contextlib.suppress(RedisError):
            self._redis.zrem(WORKERS_KEY, self._name)

    def _run(self) -> None:
        while not self._stopped.is_set():
            now = time.time()
            try:
                with self._redis.pipeline(transaction=False) as pipe:
                    pipe.zadd(WORKERS_KEY, {self._name: now})
                    pipe.zremrangebyscore(WORKERS_KEY, "-inf", now - _FORGET_AFTER_S)
                    pipe.execute()
            except RedisError as exc:
                log.warning("heartbeat to Redis failed: %s", exc)
            self._stopped.wait(self._interval_s)
