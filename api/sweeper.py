"""Periodic housekeeping: expire jobs that waited too long, delete jobs past their retention.

Every API process runs the loop; a Redis lock lets one of them sweep per interval.
"""

import asyncio
import logging
import time

from fastapi.concurrency import run_in_threadpool
from redis.exceptions import RedisError

from api.deps import Services
from shared.jobstore import utc_now
from shared.metrics import count_finished
from shared.schema import JobStatus
from shared.storage import StorageError, job_prefix

log = logging.getLogger(__name__)

_LOCK_KEY = "t2i:sweeper:lock"
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


async def run_sweeper(services: Services) -> None:
    interval_s = services.api.sweep_interval_s
    while True:
        try:
            lock_ms = max(1, int(interval_s * 900))
            if await services.async_redis.set(_LOCK_KEY, "1", nx=True, px=lock_ms):
                expired, deleted = await run_in_threadpool(sweep_once, services)
                if expired or deleted:
                    log.info("sweeper: %d jobs expired, %d deleted", expired, deleted)
        except RedisError as exc:
            log.warning("sweeper: Redis unavailable: %s", exc)
        except Exception:
            log.exception("sweeper failed; trying again next interval")
        await asyncio.sleep(interval_s)
