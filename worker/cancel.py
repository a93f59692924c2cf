"""Which running jobs were canceled, known without a Redis round trip per denoising step.

The job store publishes each cancel; a subscriber thread records it. A slow poll of the watched
jobs' states covers messages lost while the subscription was down.
"""

import logging
import threading

from redis import Redis
from redis.exceptions import RedisError

from shared.jobstore import JobStore
from shared.keys import CANCEL_CHANNEL
from shared.schema import JobStatus

log = logging.getLogger(__name__)


class CancelWatcher:
    def __init__(self, redis: Redis, store: JobStore, poll_interval_s: float = 1.0) -> None:
        self._redis = redis
        self._store = store
        self._poll_interval_s = poll_interval_s
        self._lock = threading.Lock()
        self._watched: set[str] = set()
        self._canceled: set[str] = set()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cancel-watcher", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join(timeout=2 * self._poll_interval_s + 1)

    def watch(self, job_id: str) -> None:
        with self._lock:
            self._watched.add(job_id)

    def unwatch(self, job_id: str) -> None:
        with self._lock:
            self._watched.discard(job_id)
            self._canceled.discard(job_id)

    def is_canceled(self, job_id: str) -> bool:
        return job_id in self._canceled

    def _mark(self, job_id: str) -> None:
        with self._lock:
            if job_id in self._watched:
                self._canceled.add(job_id)

    def _poll(self) -> None:
        with self._lock:
            watched = list(self._watched)
        for job_id in watched:
            if self._store.status(job_id) is JobStatus.CANCELED:
                self._mark(job_id)

    def _run(self) -> None:
        while not self._stopped.is_set():
            try:
                with self._redis.pubsub(ignore_subscribe_messages=True) as pubsub:
                    pubsub.subscribe(CANCEL_CHANNEL)
                    # Jobs canceled before the subscription took hold.
                    self._poll()
                    while not self._stopped.is_set():
                        message = pubsub.get_message(timeout=self._poll_interval_s)
                        if message is not None:
                            self._mark(message["data"].decode())
                        else:
                            self._poll()
            except RedisError as exc:
                log.warning("cancel watcher lost Redis (%s); retrying", exc)
                self._stopped.wait(self._poll_interval_s)
