"""The leases of the jobs this worker holds: renewed while it is healthy, lost when not."""

import logging
import threading

from shared.jobstore import Holder, JobStore

log = logging.getLogger(__name__)


class LeaseKeeper:
    """Tracks the jobs this worker holds and renews their leases; a job whose lease it no longer
    holds (it lapsed, or the job was canceled, expired or requeued) is marked lost.

    A lease runs `lease_s` from each renewal by Redis's clock, never this machine's: the reaper
    that judges it runs elsewhere."""

    def __init__(self, store: JobStore, worker_name: str, lease_s: float) -> None:
        self._store = store
        self.worker_name = worker_name
        self.lease_s = lease_s
        self._lock = threading.Lock()
        self._held: dict[str, int] = {}
        self._lost: set[str] = set()

    def hold(self, job_id: str, attempt: int) -> Holder:
        with self._lock:
            self._held[job_id] = attempt
            self._lost.discard(job_id)
        return Holder(self.worker_name, attempt)

    def release(self, job_id: str) -> None:
        with self._lock:
            self._held.pop(job_id, None)
            self._lost.discard(job_id)

    def is_lost(self, job_id: str) -> bool:
        return job_id in self._lost

    def held(self) -> dict[str, Holder]:
        with self._lock:
            return {job_id: Holder(self.worker_name, a) for job_id, a in self._held.items()}

    def renew(self) -> None:
        """Extend every held lease; raises RedisError when Redis cannot be reached."""
        with self._lock:
            attempts = dict(self._held)
        lost = self._store.renew(self.worker_name, self.lease_s, attempts)
        with self._lock:
            for job_id in lost:
                if self._held.get(job_id) == attempts[job_id] and job_id not in self._lost:
                    log.warning(
                        "job %s attempt %d is no longer this worker's", job_id, attempts[job_id]
                    )
                    self._lost.add(job_id)
