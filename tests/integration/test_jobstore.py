"""The job store's compare-and-set against a real redis-server."""

import time
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

from redis import Redis

from shared.jobstore import Holder, JobStore, RequeueReason, Reservation
from shared.keys import DISPATCHED_KEY, LEASES_KEY
from shared.queue import make_celery, render_queue
from shared.records import new_job_id, utc_now
from shared.recovery import Reaper
from shared.schema import GenerationRequest, JobErrorType, JobRecord, JobStatus
from shared.settings import CoreSettings, WebhookSettings
from shared.webhooks import Webhooks
from tests.support import wait_until
from worker.cancel import CancelWatcher


def _queued(store: JobStore) -> JobRecord:
    record = JobRecord(
        id=new_job_id(),
        status=JobStatus.QUEUED,
        created_at=utc_now(),
        request=GenerationRequest(prompt="a cat", seed=1),
    )
    store.create(record)
    return record


def test_create_and_read_back(redis_client: Redis) -> None:
    store = JobStore(redis_client, retention_s=600)
    record = _queued(store)
    assert store.get(record.id) == record
    assert 590 < redis_client.ttl(f"t2i:job:{record.id}") <= 600
    assert store.get(new_job_id()) is None


def test_only_one_of_many_concurrent_reservations_wins(redis_client: Redis) -> None:
    store = JobStore(redis_client, retention_s=600)
    record = _queued(store)
    with ThreadPoolExecutor(16) as pool:
        results = list(
            pool.map(
                lambda n: store.reserve(record.id, 1, f"render@w.{n}", 60),
                range(32),
            )
        )
    assert results.count(Reservation.RESERVED) == 1
    assert set(results) == {Reservation.RESERVED, Reservation.HELD}
    job = store.get(record.id)
    assert job.status is JobStatus.QUEUED and job.worker is not None


def test_a_terminal_job_never_changes(redis_client: Redis) -> None:
    store = JobStore(redis_client, retention_s=600)
    record = _queued(store)
    holder = Holder("render@a.1", 1)
    store.reserve(record.id, 1, holder.worker, 60)
    assert store.transition(record.id, JobStatus.CANCELED).applied
    late = store.admit(record.id, holder, utc_now())
    assert (late.applied, late.previous) == (False, JobStatus.CANCELED)
    assert not store.transition(record.id, JobStatus.SUCCEEDED, images=[]).applied
    assert not store.update_progress(record.id, holder, step=1, total=2).applied
    assert redis_client.zscore(LEASES_KEY, record.id) is None
    final = store.get(record.id)
    assert final.status is JobStatus.CANCELED and final.progress is None


def test_fields_are_written_with_the_transition(redis_client: Redis) -> None:
    store = JobStore(redis_client, retention_s=600)
    record = _queued(store)
    started, holder = utc_now(), Holder("render@a.1", 1)
    store.reserve(record.id, 1, holder.worker, 60)
    assert store.admit(record.id, holder, started).applied
    assert store.update_progress(record.id, holder, step=2, total=4).applied
    job = store.get(record.id)
    assert job.started_at == started and (job.progress.step, job.progress.total) == (2, 4)


def test_missing_job_reports_no_previous_state(redis_client: Redis) -> None:
    result = JobStore(redis_client, 600).transition(new_job_id(), JobStatus.RUNNING)
    assert (result.applied, result.previous) == (False, None)


def test_the_cancel_watcher_learns_of_cancels_without_asking_per_step(redis_client: Redis) -> None:
    store = JobStore(redis_client, retention_s=600)
    early, watched, ignored = (_queued(store) for _ in range(3))
    store.transition(early.id, JobStatus.CANCELED)
    watcher = CancelWatcher(redis_client, store, poll_interval_s=0.2)
    watcher.watch(early.id)
    watcher.watch(watched.id)
    watcher.start()
    try:
        wait_until(lambda: watcher.is_canceled(early.id), 5, "the poll to see an earlier cancel")
        assert not watcher.is_canceled(watched.id)
        store.transition(watched.id, JobStatus.RUNNING)
        store.transition(watched.id, JobStatus.CANCELED)
        store.transition(ignored.id, JobStatus.CANCELED)
        wait_until(lambda: watcher.is_canceled(watched.id), 5, "the published cancel")
        assert not watcher.is_canceled(ignored.id)
        watcher.unwatch(watched.id)
        assert not watcher.is_canceled(watched.id)
    finally:
        watcher.stop()


def test_every_write_of_an_attempt_is_fenced_on_its_worker_and_attempt(
    redis_client: Redis,
) -> None:
    store = JobStore(redis_client, retention_s=600)
    record = _queued(store)
    owner, intruder, stale = (
        Holder("render@a.1", 1),
        Holder("render@b.2", 1),
        Holder("render@a.1", 2),
    )
    assert store.reserve(record.id, 2, owner.worker, 60) is Reservation.OTHER_ATTEMPT
    assert store.reserve(record.id, 1, owner.worker, 60) is Reservation.RESERVED
    assert store.reserve(record.id, 1, intruder.worker, 60) is Reservation.HELD
    assert store.get(record.id).status is JobStatus.QUEUED
    assert not store.admit(record.id, intruder, utc_now()).applied
    assert store.admit(record.id, owner, utc_now()).applied
    assert not store.update_progress(record.id, intruder, step=1, total=2).applied
    assert store.update_progress(record.id, owner, step=1, total=2).applied
    for holder in (intruder, stale):
        assert not store.transition(record.id, JobStatus.SUCCEEDED, holder=holder).applied
    assert store.transition(record.id, JobStatus.SUCCEEDED, holder=owner).applied
    assert redis_client.zscore(LEASES_KEY, record.id) is None


def test_a_lapsed_lease_starts_a_new_attempt_until_the_retry_cap(redis_client: Redis) -> None:
    store = JobStore(redis_client, retention_s=600)
    record = _queued(store)
    first = Holder("render@killed.1", 1)
    store.reserve(record.id, 1, first.worker, 0.5)
    store.admit(record.id, first, utc_now())
    assert store.lapsed_leases(store.now(), 10) == []
    assert not store.requeue(record.id, RequeueReason.LAPSED, max_retries=1).requeued

    time.sleep(0.6)
    assert store.lapsed_leases(store.now(), 10) == [record.id]
    again = store.requeue(record.id, RequeueReason.LAPSED, max_retries=1)
    assert (again.requeued, again.attempt) == (True, 2)
    job = store.get(record.id)
    assert (job.status, job.attempt, job.retries, job.worker) == (JobStatus.QUEUED, 2, 1, None)
    assert store.queue_position(record.id) == 0
    # The lost worker can no longer write, and its old message no longer reserves.
    assert not store.transition(record.id, JobStatus.SUCCEEDED, holder=first).applied
    assert store.reserve(record.id, 1, "render@b.2", 60) is Reservation.OTHER_ATTEMPT

    second = Holder("render@b.2", 2)
    # A lease that has run out the moment it is written.
    assert store.reserve(record.id, 2, second.worker, -1) is Reservation.RESERVED
    failed = store.requeue(record.id, RequeueReason.LAPSED, max_retries=1)
    assert (failed.failed, failed.attempt) == (True, 2)
    job = store.get(record.id)
    assert job.status is JobStatus.FAILED and job.error.type is JobErrorType.WORKER_LOST
    later = store.now() + 9
    assert store.queue_position(record.id) is None and store.lapsed_leases(later, 10) == []


def test_renewing_extends_held_leases_and_names_the_jobs_no_longer_held(
    redis_client: Redis,
) -> None:
    store = JobStore(redis_client, retention_s=600)
    kept, canceled = _queued(store), _queued(store)
    worker = "render@a.1"
    for record in (kept, canceled):
        store.reserve(record.id, 1, worker, 5)
    store.transition(canceled.id, JobStatus.CANCELED)
    before = store.now()
    lost = store.renew(worker, 50, {kept.id: 1, canceled.id: 1})
    assert lost == {canceled.id}
    # Fifty seconds from the renewal by Redis's clock.
    assert before + 50 <= redis_client.zscore(LEASES_KEY, kept.id) <= store.now() + 50
    assert store.renew("render@other.2", 90, {kept.id: 1}) == {kept.id}
    assert store.renew(worker, 90, {kept.id: 2}) == {kept.id}


def test_a_job_whose_message_never_came_is_found_and_sent_again(redis_client: Redis) -> None:
    store = JobStore(redis_client, retention_s=600)
    passed_over, taken = _queued(store), _queued(store)
    [(first_id, sent_at), (second_id, _)] = store.unreserved_dispatches(time.time() + 1, 10)
    assert (first_id, second_id) == (passed_over.id, taken.id)
    store.reserve(taken.id, 1, "render@a.1", 60)
    assert store.latest_reserved_dispatch() >= sent_at
    assert store.unreserved_dispatches(time.time() + 1, 10) == [(passed_over.id, sent_at)]
    too_early = store.requeue(
        passed_over.id, RequeueReason.LOST, max_retries=0, sent_before=sent_at - 1
    )
    assert not too_early.requeued
    resent = store.requeue(passed_over.id, RequeueReason.LOST, max_retries=1, sent_before=sent_at)
    assert (resent.requeued, resent.attempt) == (True, 2)
    assert store.get(passed_over.id).retries == 1
    # A reserved job is never taken for lost.
    assert not store.requeue(
        taken.id, RequeueReason.LOST, max_retries=1, sent_before=time.time()
    ).requeued
    # A lost message counts as a retry: past the cap the job fails instead of going out again.
    failed = store.requeue(
        passed_over.id, RequeueReason.LOST, max_retries=1, sent_before=time.time() + 1
    )
    assert (failed.failed, failed.requeued, failed.attempt) == (True, False, 2)
    job = store.get(passed_over.id)
    assert job.status is JobStatus.FAILED and job.error.type is JobErrorType.WORKER_LOST
    assert "message never reached a worker" in job.error.message
    assert store.unreserved_dispatches(time.time() + 9, 10) == []


def test_a_handed_back_job_is_queued_again_without_counting_a_retry(redis_client: Redis) -> None:
    store = JobStore(redis_client, retention_s=600)
    record = _queued(store)
    store.reserve(record.id, 1, "render@stopping.1", 60)
    other = store.requeue(record.id, RequeueReason.HANDED_BACK, max_retries=0, worker="render@b.2")
    assert not other.requeued
    back = store.requeue(
        record.id,
        RequeueReason.HANDED_BACK,
        max_retries=0,
        worker="render@stopping.1",
    )
    assert (back.requeued, back.attempt) == (True, 2)
    job = store.get(record.id)
    assert (job.status, job.worker, job.retries) == (JobStatus.QUEUED, None, 0)
    assert [entry for entry, _ in store.unreserved_dispatches(time.time() + 1, 10)] == [record.id]


def test_the_reaper_judges_lost_messages_per_model_queue(redis_client: Redis) -> None:
    """A job waiting behind a busy model's queue is not taken for lost because another model's
    worker reserved later jobs; once its own model's worker passes it over, it is."""
    url = "redis://{host}:{port}/{db}".format(**redis_client.connection_pool.connection_kwargs)
    core = CoreSettings(redis_url=url, model_id="tiny", redispatch_after_s=1)
    store = JobStore(redis_client, retention_s=600)
    sent: list[tuple[str, int]] = []
    reaper = Reaper(
        redis_client,
        store,
        core,
        lambda job_id, attempt: sent.append((job_id, attempt)),
        Webhooks(redis_client, make_celery(core), WebhookSettings(), 600),
    )
    start, sent_from = utc_now() - timedelta(seconds=100), store.now() - 100

    def queued(model: str, seconds_later: float) -> JobRecord:
        record = JobRecord(
            id=new_job_id(),
            status=JobStatus.QUEUED,
            created_at=start + timedelta(seconds=seconds_later),
            request=GenerationRequest(prompt="a cat", seed=1, model=model),
        )
        store.create(record)
        # Sent that long ago by Redis's clock, which stamps every send.
        redis_client.zadd(DISPATCHED_KEY, {record.id: sent_from + seconds_later})
        return record

    other_queue = render_queue(core, "other")
    waiting = queued("other", 0)
    redis_client.rpush(other_queue, "a message ahead of it")
    later_default = queued("tiny", 50)
    store.reserve(later_default.id, 1, "render@default.1", 60, core.queue_name)
    assert reaper.reap_once().resent == 0 and sent == []

    later_other = queued("other", 50)
    store.reserve(later_other.id, 1, "render@other.1", 60, other_queue)
    assert reaper.reap_once().resent == 1
    assert sent == [(waiting.id, 2)]
