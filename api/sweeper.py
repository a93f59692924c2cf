"""Periodic housekeeping: expire jobs that waited too long, delete jobs past their retention,
and reap jobs whose worker is gone (shared/recovery.py).

Every API process runs the loops; a Redis lock lets one of them do each round.
"""

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from fastapi.concurrency import run_in_threadpool
from redis.exceptions import RedisError

from api.deps import Services
from shared.jobstore import utc_now
from shared.logs import RepeatedFailures
from shared.metrics import count_finished
from shared.schema import JobStatus
from shared.storage import StorageError, job_prefix

log = logging.getLogger(__name__)

_SWEEP_LOCK_KEY = "t2i:sweeper:lock"
_REAP_LOCK_KEY = "t2i:reaper:lock"
_BATCH = 200


def sweep_once(services: Services) -> tuple[int, int]:
    """(jobs expired in the queue, jobs deleted after their retention)."""
    store, now = services.store, time.time()
    expired = 0
    for job_id in store.oldest_queued(_BATCH):
        record = store.get(job_id)
        if record is None:
            continue
        if not record.waited_longer_than(services.core.queue_timeout_s, utc_now()):
            break
        if store.expire(job_id):
            count_finished(JobStatus.EXPIRED)
            services.webhooks.job_event(record, JobStatus.EXPIRED)
            expired += 1
    deleted = 0
    for owner, job_id in store.expired_for_retention(now - store.retention_s, _BATCH):
        try:
            services.storage.delete_prefix(job_prefix(services.storage_settings.key_prefix, job_id))
        except StorageError as exc:
            log.warning(
                "could not delete the images of job %s yet: %s",
                job_id,
                exc,
                extra={"job_id": job_id},
            )
            continue
        store.delete(owner, job_id)
        deleted += 1
    return expired, deleted


async def _every(
    services: Services,
    stop: asyncio.Event,
    name: str,
    lock_key: str,
    interval_s: float,
    action: Callable[[], object],
    on_redis_error: Callable[[], None] = lambda: None,
) -> None:
    """Run `action` every `interval_s` in whichever API process takes the round's lock, until
    `stop` is set.

    The loop ends on `stop`, not on cancellation: a cancel that lands while `action` runs in the
    thread pool is absorbed by the pool's shield, and the loop would go on forever.
    """
    failures = RepeatedFailures(log, name)
    while not stop.is_set():
        try:
            lock_ms = max(1, int(interval_s * 900))
            if await services.async_redis.set(lock_key, "1", nx=True, px=lock_ms):
                outcome = await run_in_threadpool(action)
                if outcome:
                    log.info("%s: %s", name, outcome)
        except RedisError as exc:
            on_redis_error()
            failures.failed(exc, expected=True)
        except Exception as exc:
            failures.failed(exc, expected=False)
        else:
            failures.succeeded()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval_s)


async def run_sweeper(services: Services, stop: asyncio.Event) -> None:
    def sweep() -> str:
        expired, deleted = sweep_once(services)
        return f"{expired} jobs expired, {deleted} deleted" if expired or deleted else ""

    interval_s = services.api.sweep_interval_s
    await _every(services, stop, "sweeper", _SWEEP_LOCK_KEY, interval_s, sweep)


async def run_reaper(services: Services, stop: asyncio.Event) -> None:
    def reap() -> str:
        reaped = reaper.reap_once()
        if not (reaped.requeued or reaped.failed or reaped.resent or reaped.pumped):
            return ""
        return (
            f"{reaped.requeued} requeued, {reaped.failed} failed, {reaped.resent} sent again, "
            f"{reaped.pumped} sent from the fair queues"
        )

    reaper = services.reaper
    interval_s = services.api.reap_interval_s
    await _every(services, stop, "reaper", _REAP_LOCK_KEY, interval_s, reap, reaper.redis_lost)
