"""Periodic housekeeping: expire jobs that waited too long, delete jobs past their retention,
and reap jobs whose worker is gone (shared/recovery.py).

Every API process runs the loops; a Redis lock lets one of them do each round. A sweep round
works through batches until nothing is due or its time budget is spent; while work is left, the
next round starts at once instead of an interval later, so retention keeps up with any finish
rate.
"""

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from dataclasses import dataclass

from fastapi.concurrency import run_in_threadpool
from redis import Redis
from redis.asyncio import Redis as AsyncRedis
from redis.exceptions import RedisError

from api.deps import Services
from api.metrics import JOBS_DELETED
from shared.logs import RepeatedFailures
from shared.metrics import count_finished
from shared.records import utc_now
from shared.schema import JobStatus
from shared.scripts import load_script
from shared.storage import StorageError, job_prefix

log = logging.getLogger(__name__)

_SWEEP_LOCK_KEY = "t2i:sweeper:lock"
_REAP_LOCK_KEY = "t2i:reaper:lock"
_BATCH = 200
# A round ends after this long even with work left, so that shutdown waits at most this (and a
# batch) and the lock may change hands; the next round starts at once.
_ROUND_BUDGET_S = 5.0
# How long the sweeper's lock outlives its last extension: longer than one batch takes, short
# enough that another process takes over soon after the holder dies.
_SWEEP_HOLD_S = 10.0
# Storage deletes in flight at once, so that the store's latency does not bound throughput.
_DELETE_THREADS = 8

_SET_TTL = load_script("round_lock_ttl")


class RoundLock:
    """One process's turn at a periodic round. Held while the round runs (extended between its
    batches), then left to lapse `round_s` after the round began, so that the next round comes
    an interval later whichever process takes it, or released at once when work is left."""

    def __init__(self, redis: Redis, key: str, round_s: float, hold_s: float = 0.0) -> None:
        self._redis = redis
        self._key = key
        self._round_ms = max(1, int(round_s * 1000))
        self._hold_ms = max(self._round_ms, int(hold_s * 1000))
        self._token = ""
        self._taken = 0.0

    async def take(self, async_redis: AsyncRedis) -> bool:
        token = uuid.uuid4().hex
        if not await async_redis.set(self._key, token, nx=True, px=self._hold_ms):
            return False
        self._token, self._taken = token, time.monotonic()
        return True

    def extend(self) -> bool:
        """Hold on for another batch; False when the lock lapsed and another process may hold
        it, so this round must stop."""
        return bool(self._redis.eval(_SET_TTL, 1, self._key, self._token, self._hold_ms))

    async def release(self, async_redis: AsyncRedis, at_once: bool) -> None:
        elapsed_ms = int((time.monotonic() - self._taken) * 1000)
        left_ms = 0 if at_once else max(1, self._round_ms - elapsed_ms)
        await async_redis.eval(_SET_TTL, 1, self._key, self._token, left_ms)


@dataclass
class Swept:
    expired: int = 0
    deleted: int = 0
    # The round stopped with work maybe left (its budget spent, or its lock lost).
    more: bool = False


def sweep_once(
    services: Services, lock: RoundLock | None = None, budget_s: float = _ROUND_BUDGET_S
) -> Swept:
    """Expire jobs that waited too long, then delete jobs past their retention, a batch at a
    time, until none is due or `budget_s` is spent (or `lock` is lost)."""
    deadline = time.monotonic() + budget_s

    def go_on() -> bool:
        return time.monotonic() < deadline and (lock is None or lock.extend())

    swept = Swept()
    with ThreadPoolExecutor(_DELETE_THREADS, thread_name_prefix="sweep-delete") as pool:
        done = _expire_waiting(services, swept, go_on) and _delete_retained(
            services, swept, pool, go_on
        )
    swept.more = not done
    return swept


def _expire_waiting(services: Services, swept: Swept, go_on: Callable[[], bool]) -> bool:
    """Expire the queue's jobs that outwaited the queue timeout, oldest first; False when it
    stopped before it was done."""
    store, timeout_s = services.store, services.core.queue_timeout_s
    # Entries left in the queue (records gone, or jobs that moved on meanwhile) are stepped over.
    skipped = 0
    while job_ids := store.oldest_queued(_BATCH, skipped):
        if not go_on():
            return False
        now = utc_now()
        for job_id, record in zip(job_ids, store.get_many(job_ids), strict=True):
            if record is None:
                skipped += 1
                continue
            if not record.waited_longer_than(timeout_s, now):
                return True
            if store.expire(job_id):
                count_finished(JobStatus.EXPIRED)
                services.webhooks.job_event(record, JobStatus.EXPIRED)
                swept.expired += 1
            else:
                skipped += 1
    return True


def _delete_retained(
    services: Services, swept: Swept, pool: ThreadPoolExecutor, go_on: Callable[[], bool]
) -> bool:
    """Delete jobs past their retention with their images; False when it stopped before it was
    done. A storage failure ends the work until the next round, an interval later."""
    store, key_prefix = services.store, services.storage_settings.key_prefix
    while batch := store.expired_for_retention(time.time() - store.retention_s, _BATCH):
        if not go_on():
            return False
        futures: dict[Future[int], tuple[str | None, str]] = {
            pool.submit(services.storage.delete_prefix, job_prefix(key_prefix, job_id)): (
                owner,
                job_id,
            )
            for owner, job_id in batch
        }
        gone: list[tuple[str | None, str]] = []
        failed = False
        for future in as_completed(futures):
            owner, job_id = futures[future]
            if future.cancelled():
                continue
            try:
                future.result()
            except StorageError as exc:
                log.warning(
                    "could not delete the images of job %s yet: %s",
                    job_id,
                    exc,
                    extra={"job_id": job_id},
                )
                if not failed:
                    failed = True
                    # The store is failing: the rest would only wait out their timeouts.
                    for pending in futures:
                        pending.cancel()
                continue
            gone.append((owner, job_id))
        store.delete_many(gone)
        swept.deleted += len(gone)
        JOBS_DELETED.inc(len(gone))
        if failed:
            return True
    return True


async def _every(
    services: Services,
    stop: asyncio.Event,
    name: str,
    lock_key: str,
    interval_s: float,
    action: Callable[[RoundLock], tuple[str, bool]],
    on_redis_error: Callable[[], None] = lambda: None,
    hold_s: float = 0.0,
) -> None:
    """Run `action` every `interval_s` in whichever API process takes the round's lock, until
    `stop` is set; at once again when it says work is left. `action` returns what to log and
    whether work is left.

    The loop ends on `stop`, not on cancellation: a cancel that lands while `action` runs in the
    thread pool is absorbed by the pool's shield, and the loop would go on forever.
    """
    failures = RepeatedFailures(log, name)
    lock = RoundLock(services.redis, lock_key, interval_s * 0.9, hold_s)
    while not stop.is_set():
        more = False
        try:
            if await lock.take(services.async_redis):
                try:
                    outcome, more = await run_in_threadpool(action, lock)
                finally:
                    await lock.release(services.async_redis, at_once=more)
                if outcome:
                    log.info("%s: %s", name, outcome)
        except RedisError as exc:
            more = False
            on_redis_error()
            failures.failed(exc, expected=True)
        except Exception as exc:
            more = False
            failures.failed(exc, expected=False)
        else:
            failures.succeeded()
        if more:
            continue
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval_s)


async def run_sweeper(services: Services, stop: asyncio.Event) -> None:
    def sweep(lock: RoundLock) -> tuple[str, bool]:
        swept = sweep_once(services, lock)
        if not (swept.expired or swept.deleted):
            return "", swept.more
        return f"{swept.expired} jobs expired, {swept.deleted} deleted", swept.more

    interval_s = services.api.sweep_interval_s
    await _every(
        services, stop, "sweeper", _SWEEP_LOCK_KEY, interval_s, sweep, hold_s=_SWEEP_HOLD_S
    )


async def run_reaper(services: Services, stop: asyncio.Event) -> None:
    def reap(_: RoundLock) -> tuple[str, bool]:
        reaped = reaper.reap_once()
        if not (reaped.requeued or reaped.failed or reaped.resent or reaped.pumped):
            return "", False
        return (
            f"{reaped.requeued} requeued, {reaped.failed} failed, {reaped.resent} sent again, "
            f"{reaped.pumped} sent from the fair queues"
        ), False

    reaper = services.reaper
    interval_s = services.api.reap_interval_s
    await _every(services, stop, "reaper", _REAP_LOCK_KEY, interval_s, reap, reaper.redis_lost)
