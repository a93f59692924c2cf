"""The job store's compare-and-set against a real redis-server."""

from concurrent.futures import ThreadPoolExecutor

from redis import Redis

from shared.jobstore import JobStore, new_job_id, utc_now
from shared.schema import GenerationRequest, JobRecord, JobStatus
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


def test_only_one_of_many_concurrent_claims_wins(redis_client: Redis) -> None:
    store = JobStore(redis_client, retention_s=600)
    record = _queued(store)
    with ThreadPoolExecutor(16) as pool:
        results = list(
            pool.map(
                lambda _: store.transition(record.id, JobStatus.RUNNING, expected=JobStatus.QUEUED),
                range(32),
            )
        )
    assert sum(result.applied for result in results) == 1
    assert store.get(record.id).status is JobStatus.RUNNING


def test_a_terminal_job_never_changes(redis_client: Redis) -> None:
    store = JobStore(redis_client, retention_s=600)
    record = _queued(store)
    assert store.transition(record.id, JobStatus.CANCELED).applied
    late = store.transition(record.id, JobStatus.RUNNING, expected=JobStatus.QUEUED)
    assert (late.applied, late.previous) == (False, JobStatus.CANCELED)
    assert not store.transition(record.id, JobStatus.SUCCEEDED, images=[]).applied
    assert not store.update_progress(record.id, step=1, total=2).applied
    final = store.get(record.id)
    assert final.status is JobStatus.CANCELED and final.progress is None


def test_fields_are_written_with_the_transition(redis_client: Redis) -> None:
    store = JobStore(redis_client, retention_s=600)
    record = _queued(store)
    started = utc_now()
    assert store.transition(record.id, JobStatus.RUNNING, started_at=started).applied
    assert store.update_progress(record.id, step=2, total=4).applied
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


def test_only_a_running_job_of_the_named_worker_is_reclaimed(redis_client: Redis) -> None:
    store = JobStore(redis_client, retention_s=600)
    record = _queued(store)
    assert not store.reclaim(record.id, None, "render@b.2", utc_now())
    store.transition(record.id, JobStatus.RUNNING, worker="render@a.1")
    assert not store.reclaim(record.id, "render@other.9", "render@b.2", utc_now())
    assert store.reclaim(record.id, "render@a.1", "render@b.2", utc_now())
    assert not store.reclaim(record.id, "render@a.1", "render@c.3", utc_now())
    job = store.get(record.id)
    assert job.status is JobStatus.RUNNING and job.worker == "render@b.2"
    store.transition(record.id, JobStatus.FAILED)
    assert not store.reclaim(record.id, "render@b.2", "render@c.3", utc_now())
