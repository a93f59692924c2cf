"""A live worker announces itself in Redis, so the API can tell whether anyone will render."""

import contextlib
import logging
from collections.abc import Callable

from redis import Redis
from redis.exceptions import RedisError

from shared.info import WorkerInfo
from shared.queue import WORKERS_KEY, worker_info_key
from shared.scripts import load_script

log = logging.getLogger(__name__)

_FORGET_AFTER_S = 24 * 3600

_BEAT = load_script("heartbeat")


class Heartbeat:
    def __init__(
        self,
        redis: Redis,
        worker_name: str,
        info: Callable[[], WorkerInfo] | None = None,
        after_beat: Callable[[], object] | None = None,
    ) -> None:
        self._redis = redis
        self._name = worker_name
        # Run once the worker counts as live: it fills the dispatch window its arrival widened.
        self._after_beat = after_beat
        # What /info reports about this worker, read anew for each beat (its modules' dtypes
        # are read off the modules themselves).
        self._info = info
        self._beat = redis.register_script(_BEAT)

    def beat(self) -> None:
        try:
            with self._redis.pipeline(transaction=False) as pipe:
                if self._info is not None:
                    info = self._info().model_dump_json()
                    pipe.set(worker_info_key(self._name), info, ex=_FORGET_AFTER_S)
                self._beat(keys=[WORKERS_KEY], args=[self._name, _FORGET_AFTER_S], client=pipe)
                pipe.execute()
            if self._after_beat is not None:
                self._after_beat()
        except RedisError as exc:
            log.warning("heartbeat to Redis failed: %s", exc)

    def leave(self) -> None:
        """Leave the live set at once: a stopping worker takes no more jobs."""
        with contextlib.suppress(RedisError):
            self._redis.zrem(WORKERS_KEY, self._name)
            self._redis.delete(worker_info_key(self._name))
