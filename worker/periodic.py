"""A daemon thread that calls an action every interval until stopped."""

import logging
import threading
from collections.abc import Callable

from redis.exceptions import RedisError

from shared.logs import RepeatedFailures

log = logging.getLogger(__name__)

# Failures that come from outside (Redis or the network down) and end on their own.
OUTAGES: tuple[type[Exception], ...] = (RedisError, OSError)


class Periodic:
    """Calls `action` every `interval_s`; a failing round is logged (rate-limited while the
    failures go on) and the next one goes on."""

    def __init__(self, name: str, interval_s: float, action: Callable[[], None]) -> None:
        self._interval_s = interval_s
        self._action = action
        self._failures = RepeatedFailures(log, name)
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join(timeout=self._interval_s + 1)

    def _run(self) -> None:
        while not self._stopped.is_set():
            try:
                self._action()
            except Exception as exc:
                self._failures.failed(exc, expected=isinstance(exc, OUTAGES))
            else:
                self._failures.succeeded()
            self._stopped.wait(self._interval_s)
