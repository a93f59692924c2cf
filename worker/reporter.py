"""Bookkeeping off the GPU thread: progress writes and webhook enqueues, best effort.

The GPU thread only posts an action; a reporter thread runs it. A slow or failing Redis delays
or drops a progress update, never a render, and a failed write never fails a job.
"""

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable

log = logging.getLogger(__name__)

Action = Callable[[], None]


class Reporter:
    """Runs posted actions on its own thread. An action posted under a key that is still
    pending replaces it (the latest progress wins); past `max_pending` the oldest is dropped."""

    def __init__(self, name: str = "reporter", max_pending: int = 1024) -> None:
        self._max_pending = max_pending
        self._pending: OrderedDict[str, Action] = OrderedDict()
        self._wake = threading.Condition()
        self._stopping = False
        self.failures = 0
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def post(self, key: str, action: Action) -> None:
        with self._wake:
            self._pending.pop(key, None)
            self._pending[key] = action
            if len(self._pending) > self._max_pending:
                dropped, _ = self._pending.popitem(last=False)
                log.warning("reporter is behind; dropped the update %s", dropped)
            self._wake.notify()

    def stop(self, timeout_s: float = 5.0) -> None:
        """Run what is pending, then stop."""
        with self._wake:
            self._stopping = True
            self._wake.notify()
        self._thread.join(timeout_s)

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._pending and not self._stopping:
                    self._wake.wait()
                if not self._pending:
                    return
                key, action = self._pending.popitem(last=False)
            try:
                action()
            except Exception as exc:
                self.failures += 1
                log.warning("bookkeeping %s failed (the job goes on): %s", key, exc)
