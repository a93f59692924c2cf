"""The gateway's reads against a real redis-server: listings from per-status indexes, queue
rates from O(1) reads, finished jobs' event streams, and the broker message the create script
pushes."""

import asyncio
import base64
import json
import time

from redis import Redis
from redis.asyncio import Redis as AsyncRedis

from shared.asyncstore import AsyncJobStore, JobPage
from shared.jobscripts import FINISHED_EVENTS_TTL_S, RateLimit
from shared.jobstore import JobStore
from shared.keys import events_key, job_key, status_index_key
from shared.queue import make_celery, send_render
from shared.records import request_fingerprint, utc_now
from shared.schema import JobStatus
from shared.settings import CoreSettings
from tests.support import queued_record

OWNER = "abcdef012345"
RETENTION_S = 3600


def _async_store(redis: Redis) -> AsyncJobStore:
    kwargs = redis.connection_pool.connection_kwargs
    client = AsyncRedis(port=kwargs["port"], db=kwargs["db"])
    return AsyncJobStore(client, RETENTION_S, worker_max_age_s=30)


def _pages(redis: Redis, limit: int, status: JobStatus | None) -> list[JobPage]:
    """Every page of OWNER's listing, following the cursors."""

    async def walk() -> list[JobPage]:
        store = _async_store(redis)
        pages = [await store.page(OWNER, limit, None, status)]
        while pages[-1].next_cursor is not None:
            pages.append(await store.page(OWNER, limit, pages[-1].next_cursor, status))
        return pages

    return asyncio.run(walk())


def test_a_status_listing_reads_its_own_index_and_is_never_empty_while_matches_remain(
    redis_client: Redis,
) -> None:
    store = JobStore(redis_client, RETENTION_S)
    created = [queued_record(OWNER) for _ in range(300)]
    for record in created:
        store.create(record)
    # The oldest three finish; hundreds of newer queued jobs lie between them and the head.
    finished = created[:3]
    for record in finished:
        store.transition(record.id, JobStatus.RUNNING)
        store.transition(record.id, JobStatus.SUCCEEDED, finished_at=utc_now())

    pages = _pages(redis_client, 2, JobStatus.SUCCEEDED)

    assert [len(page.jobs) for page in pages] == [2, 1]
    assert [job.id for page in pages for job in page.jobs] == [r.id for r in reversed(finished)]
    assert redis_client.zcard(status_index_key(OWNER, JobStatus.QUEUED)) == 297
    assert redis_client.zcard(status_index_key(OWNER, JobStatus.RUNNING)) == 0


def test_every_listing_page_is_full_until_the_last_and_all_jobs_appear_once(
    redis_client: Redis,
) -> None:
    store = JobStore(redis_client, RETENTION_S)
    created = [queued_record(OWNER) for _ in range(25)]
    for record in created:
        store.create(record)
    gone = created[10]
    redis_client.delete(job_key(gone.id))  # past its retention, not yet swept from the index

    pages = _pages(redis_client, 10, None)

    assert [len(page.jobs) for page in pages] == [10, 10, 4]
    listed = [job.id for page in pages for job in page.jobs]
    assert listed == [r.id for r in reversed(created) if r.id != gone.id]


def test_a_requeued_or_deleted_job_moves_between_status_indexes(redis_client: Redis) -> None:
    store = JobStore(redis_client, RETENTION_S)
    record = queued_record(OWNER)
    store.create(record)
    store.transition(record.id, JobStatus.RUNNING)
    running = status_index_key(OWNER, JobStatus.RUNNING)
    queued = status_index_key(OWNER, JobStatus.QUEUED)
    assert redis_client.zrange(running, 0, -1) == [record.id.encode()]
    assert redis_client.zcard(queued) == 0

    store.delete(OWNER, record.id)

    assert redis_client.zcard(running) == redis_client.zcard(queued) == 0


def test_queue_rates_come_from_the_window_ends_and_estimate_per_position(
    redis_client: Redis,
) -> None:
    store = JobStore(redis_client, RETENTION_S)
    now = time.time()
    for finished_at in (now - 10, now - 6, now - 2):
        store.record_completion(4.0, finished_at)

    rates = store.queue_rates(worker_max_age_s=30)

    # Three completions eight seconds apart from first to last: two gaps, 0.25 jobs/s.
    assert rates.rate == 0.25
    assert rates.job_s == 4.0
    assert rates.eta_s(0) == 4.0 and rates.eta_s(3) == 16.0


def test_a_finished_jobs_events_outlive_it_only_briefly_and_its_record_stays(
    redis_client: Redis,
) -> None:
    store = JobStore(redis_client, RETENTION_S)
    record = queued_record(OWNER)
    store.create(record)
    store.transition(record.id, JobStatus.RUNNING)
    assert redis_client.ttl(events_key(record.id)) > FINISHED_EVENTS_TTL_S

    store.transition(record.id, JobStatus.SUCCEEDED, finished_at=utc_now())

    assert 0 < redis_client.ttl(events_key(record.id)) <= FINISHED_EVENTS_TTL_S
    assert redis_client.ttl(job_key(record.id)) > FINISHED_EVENTS_TTL_S
    events = redis_client.xrange(events_key(record.id))
    assert events[-1][1][b"type"] == b"succeeded"


def _pushed(redis: Redis, queue: str) -> dict:
    message = json.loads(redis.rpop(queue))
    message["body"] = json.loads(base64.b64decode(message["body"]))
    return message


def test_the_created_jobs_message_is_the_one_celery_would_publish(redis_client: Redis) -> None:
    kwargs = redis_client.connection_pool.connection_kwargs
    celery = make_celery(CoreSettings(redis_url=f"redis://127.0.0.1:{kwargs['port']}/15"))
    record = queued_record(OWNER)

    async def create() -> None:
        store = _async_store(redis_client)
        fingerprint = request_fingerprint(record.request)
        limit = RateLimit(OWNER, per_minute=60)
        await store.create(record, None, fingerprint, 100, "renders", limit)

    asyncio.run(create())
    ours = _pushed(redis_client, "renders")
    send_render(celery, "renders", record.id, record.attempt)
    celerys = _pushed(redis_client, "renders")

    assert ours["body"] == celerys["body"]
    assert ours["body"][1] == {"job_id": record.id, "attempt": record.attempt}
    assert set(ours) == set(celerys)
    assert set(ours["headers"]) == set(celerys["headers"])
    assert set(ours["properties"]) == set(celerys["properties"])
    differing = {
        name for name in ours["headers"] if ours["headers"][name] != celerys["headers"][name]
    }
    assert differing <= {"id", "root_id", "origin"}
    assert ours["properties"]["delivery_info"] == celerys["properties"]["delivery_info"]
    assert ours["headers"]["id"] != celerys["headers"]["id"]
