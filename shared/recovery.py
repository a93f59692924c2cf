"""The reaper: gives a job whose worker is gone to another worker.

Two ways a job is stranded: its worker stopped renewing the lease (killed, hung, cut off from
Redis), or its message never reached a worker (the API died between creating the job and
sending it, or Redis lost the message). Either way the job starts a new attempt and is sent
again; a stale message of an old attempt that shows up later is dropped by the worker.

The lost attempt's images stay until the job's retention ends: a lapsed lease may be an end
that a failover undid (the promoted replica lacked it), and a client may already hold the
URLs of those images.
"""

import logging
from dataclasses import dataclass

from redis import Redis
from redis.exceptions import RedisError

from shared.jobstore import JobStore, RequeueReason
from shared.queue import SendRender, queue_depth, render_queue
from shared.schema import JobStatus
from shared.settings import CoreSettings
from shared.webhooks import Webhooks

log = logging.getLogger(__name__)

_BATCH = 200


@dataclass(frozen=True)
class Reaped:
    requeued: int = 0
    failed: int = 0
    resent: int = 0
    # Jobs the round's pump of the fair queues sent (normally the scripts send them at once).
    pumped: int = 0


class Reaper:
    def __init__(
        self,
        redis: Redis,
        store: JobStore,
        settings: CoreSettings,
        send_render: SendRender,
        webhooks: Webhooks,
    ) -> None:
        self._redis = redis
        self._store = store
        self._settings = settings
        self._send = send_render
        self._webhooks = webhooks
        # Until this reaper has seen Redis for a lease period, a lapsed lease may only mean that
        # workers could not renew while Redis was away (or this process was not watching).
        self._redis_was_lost = True
        self._leases_trusted_from = 0.0

    def redis_lost(self) -> None:
        """Redis could not be reached: workers could not renew their leases meanwhile."""
        self._redis_was_lost = True

    def reap_once(self) -> Reaped:
        """One round; raises RedisError when Redis cannot be reached."""
        try:
            # Leases and send times are written by Redis's clock, so they are judged by it too:
            # this machine's clock may be seconds off the workers'.
            now = self._store.now()
        except RedisError:
            self.redis_lost()
            raise
        if self._redis_was_lost:
            self._leases_trusted_from = now + self._settings.lease_s
            self._redis_was_lost = False
        try:
            requeued, failed = self._lapsed_leases(now)
            resent, lost = self._lost_messages(now)
            return Reaped(requeued, failed + lost, resent, pumped=self._store.pump())
        except RedisError:
            self.redis_lost()
            raise

    def _lapsed_leases(self, now: float) -> tuple[int, int]:
        requeued = failed = 0
        if now < self._leases_trusted_from:
            return requeued, failed
        for job_id in self._store.lapsed_leases(now, _BATCH):
            outcome = self._store.requeue(
                job_id,
                RequeueReason.LAPSED,
                max_retries=self._settings.job_max_retries,
            )
            if outcome.attempt is None:
                continue
            if outcome.failed:
                log.warning("job %s failed: its worker was lost too many times", job_id)
                self._failed(job_id)
                failed += 1
            elif outcome.requeued:
                log.warning("job %s: its lease lapsed; sending attempt %d", job_id, outcome.attempt)
                if not outcome.sent:
                    self._send_quietly(job_id, outcome.attempt)
                requeued += 1
        return requeued, failed

    def _lost_messages(self, now: float) -> tuple[int, int]:
        """Unreserved jobs sent long enough ago that their message must be gone: a job sent
        later was already reserved (the broker queue is first in, first out), or the queue
        is empty. Each loss counts as a retry; (re-sent, failed)."""
        grace = self._settings.redispatch_after_s
        candidates = self._store.unreserved_dispatches(now - grace, _BATCH)
        if not candidates:
            return 0, 0
        resent = failed = 0
        # Per broker queue (one per model): (queue empty, latest send time reserved from it).
        queues: dict[str, tuple[bool, float]] = {}
        passed_by: set[str] = set()
        for job_id, sent_at in candidates:
            queue = render_queue(self._settings, self._store.model_of(job_id))
            if queue not in queues:
                queues[queue] = (
                    queue_depth(self._redis, queue) == 0,
                    self._store.latest_reserved_dispatch(queue),
                )
            queue_empty, latest_reserved = queues[queue]
            if queue in passed_by or (not queue_empty and latest_reserved <= sent_at + grace):
                # Oldest first: the rest of this queue's were sent later still.
                passed_by.add(queue)
                continue
            outcome = self._store.requeue(
                job_id,
                RequeueReason.LOST,
                max_retries=self._settings.job_max_retries,
                sent_before=sent_at,
            )
            if outcome.failed:
                log.warning("job %s failed: its message was lost too many times", job_id)
                self._failed(job_id)
                failed += 1
            elif outcome.requeued and outcome.attempt is not None:
                log.warning("job %s lost its message; sending attempt %d", job_id, outcome.attempt)
                if not outcome.sent:
                    self._send_quietly(job_id, outcome.attempt)
                resent += 1
        return resent, failed

    def _failed(self, job_id: str) -> None:
        record = self._store.get(job_id)
        if record is not None:
            self._webhooks.job_event(record, JobStatus.FAILED)

    def _send_quietly(self, job_id: str, attempt: int) -> None:
        try:
            self._send(job_id, attempt)
        except Exception as exc:
            # Unreserved and unsent: the next round finds it again.
            log.warning("could not send job %s: %s", job_id, exc)
