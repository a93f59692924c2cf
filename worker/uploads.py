"""Uploads that ride out a storage outage: retried with backoff for a bounded time, and while
storage is down the worker admits no new batch, so queued jobs wait instead of failing."""

import logging
import threading
import time
from collections.abc import Callable

from shared.storage import ObjectStorage, StorageError
from worker.periodic import Periodic

log = logging.getLogger(__name__)

_FIRST_DELAY_S = 0.25
_MAX_DELAY_S = 5.0
_PROBE_INTERVAL_S = 1.0


class StorageGuard:
    """Puts objects, retrying for up to `retry_s`; `on_down` and `on_up` fire when storage
    stops and starts taking writes again (an upload finds out, or a probe while it is down)."""

    def __init__(
        self,
        storage: ObjectStorage,
        retry_s: float,
        on_down: Callable[[], None],
        on_up: Callable[[], None],
    ) -> None:
        self.storage = storage
        self._retry_s = retry_s
        self._on_down = on_down
        self._on_up = on_up
        self._lock = threading.Lock()
        self._down = False
        # Its own thread: a probe of a hung store may take its full timeout.
        self._probes = Periodic("storage-probe", _PROBE_INTERVAL_S, self.probe)

    def start(self) -> None:
        self._probes.start()

    def stop(self) -> None:
        self._probes.stop()

    @property
    def down(self) -> bool:
        return self._down

    def put(self, key: str, data: bytes, content_type: str) -> None:
        """Store the object; StorageError once storage has refused it for `retry_s`."""
        deadline = time.monotonic() + self._retry_s
        delay = _FIRST_DELAY_S
        while True:
            try:
                self.storage.put(key, data, content_type)
            except StorageError as exc:
                self._set_down(True, str(exc))
                if time.monotonic() + delay > deadline:
                    raise
                time.sleep(delay)
                delay = min(2 * delay, _MAX_DELAY_S)
                continue
            self._set_down(False)
            return

    def probe(self) -> None:
        """While storage is down, see whether it takes writes again."""
        if not self._down:
            return
        try:
            self.storage.check()
        except StorageError:
            return
        self._set_down(False)

    def _set_down(self, down: bool, why: str = "") -> None:
        with self._lock:
            if self._down == down:
                return
            self._down = down
        if down:
            log.warning("storage is down (%s); admitting no new jobs until it is back", why)
            self._on_down()
        else:
            log.info("storage is back; admitting jobs again")
            self._on_up()
