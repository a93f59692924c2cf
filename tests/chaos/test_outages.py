"""Redis, the API and the object store going away mid-burst: every job the API accepted ends,
none stays `running`, and readiness keeps answering."""

import signal
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import httpx
import pytest

from shared.records import new_job_id, utc_now
from shared.schema import GenerationRequest, JobRecord, JobStatus
from tests.chaos.conftest import SMALL, Cluster, assert_all_succeeded
from tests.support import wait_until


def burst_through(
    cluster: Cluster, prompts: list[str], outage: Callable[[], None], **fields: object
) -> list[str]:
    """Submit a burst and cause `outage` once its first job has succeeded; the accepted job ids."""
    done_before = len(cluster.log_lines(" succeeded"))
    with ThreadPoolExecutor(1) as pool:
        submitted = pool.submit(cluster.submit_burst, prompts, **fields)
        wait_until(
            lambda: len(cluster.log_lines(" succeeded")) > done_before,
            60,
            "the burst to be under way",
        )
        outage()
        return submitted.result()


def restart_redis(cluster: Cluster, stop_redis: Callable[[], None]) -> None:
    stop_redis()
    time.sleep(1)
    cluster.start_redis()


def stop_storage(
    cluster: Cluster,
    stop: Callable[[], None],
    resume: Callable[[], None],
    seconds: float,
    answers: list[httpx.Response],
) -> None:
    """Storage out for `seconds`, asking /ready twice a second meanwhile."""
    stop()
    try:
        resume_at = time.monotonic() + seconds
        with httpx.Client(base_url=cluster.base_url, timeout=2.0) as client:
            while time.monotonic() < resume_at:
                # No answer within 2 s raises here and fails the test.
                answers.append(client.get("/ready"))
                time.sleep(0.5)
    finally:
        resume()


@pytest.fixture(autouse=True)
def one_worker(fresh: Cluster) -> None:
    """One worker serves this module's tests: none of them is about losing a worker."""
    fresh.shared_worker()


@pytest.fixture(scope="module", autouse=True)
def no_worker_after(cluster: Cluster) -> Iterator[None]:
    yield
    cluster.shared.clear()
    cluster.stop_workers()


def test_redis_lost_mid_burst_and_restarted_from_its_append_only_file(fresh: Cluster) -> None:
    for how, stop_redis in (("kill -9", fresh.kill_redis), ("SHUTDOWN", fresh.shut_redis_down)):
        restart = partial(restart_redis, fresh, stop_redis)
        job_ids = burst_through(fresh, [f"redis {how} {n}" for n in range(24)], restart)
        restarted_at = utc_now()
        # Celery's threads pool can crash on reconnecting (a kombu race closing the lost
        # connection twice); such a worker exits non-zero for its supervisor to restart it.
        exits: list[int] = []
        records = fresh.wait_terminal(job_ids, 120, exits)
        assert 0 not in exits, exits
        assert_all_succeeded(records, f"{how}: ")
        assert all(len(record.images) == 1 for record in records)
        assert any(record.finished_at and record.finished_at > restarted_at for record in records)


def test_a_job_whose_api_died_before_sending_it_is_still_rendered(fresh: Cluster) -> None:
    # A job stored without its message (the API stores both in one script; a message can still
    # be lost by the broker, or by an older API that sent it separately).
    orphan = JobRecord(
        id=new_job_id(),
        owner=fresh.api_key.split("_")[1],
        status=JobStatus.QUEUED,
        created_at=utc_now(),
        request=GenerationRequest(prompt="stored, never sent", seed=1, **SMALL),
    )
    fresh.store().create(orphan)

    def restart_api() -> None:
        fresh.kill_api()
        fresh.start_api()

    # And the API killed for real while clients submit (and retry with their idempotency keys).
    job_ids = burst_through(fresh, [f"api killed {n}" for n in range(16)], restart_api)
    records = fresh.wait_terminal([orphan.id, *job_ids], 90)
    assert_all_succeeded(records)
    assert records[0].attempt == 2  # sent again by the reaper


def test_storage_stopped_mid_burst_jobs_wait_then_succeed_and_ready_keeps_answering(
    fresh: Cluster,
) -> None:
    assert fresh.s3.popen is not None
    s3_process = fresh.s3.popen

    def frozen() -> None:
        s3_process.send_signal(signal.SIGSTOP)

    def thawed() -> None:
        s3_process.send_signal(signal.SIGCONT)

    outages = [
        ("frozen", frozen, thawed, 20),
        ("refusing connections", fresh.s3_proxy.refuse, fresh.s3_proxy.accept, 6),
    ]
    for how, stop, resume, seconds in outages:
        answers: list[httpx.Response] = []
        outage = partial(stop_storage, fresh, stop, resume, seconds, answers)
        job_ids = burst_through(fresh, [f"storage {how} {n}" for n in range(24)], outage)
        records = fresh.wait_terminal(job_ids, 180)
        assert_all_succeeded(records, f"{how}: ")
        down = [answer for answer in answers if answer.status_code == 503]
        assert down, f"readiness never saw the storage outage ({how})"
        for answer in down:
            assert answer.json()["error"]["details"]["storage"] != "ok", answer.text
            # Nothing internal: neither the store's address nor the proxy's.
            assert "127.0.0.1" not in answer.text
        with fresh.client() as client:
            job = client.get(f"/v1/jobs/{job_ids[-1]}").json()
            assert httpx.get(job["images"][0]["url"], timeout=10).status_code == 200
            wait_until(lambda: client.get("/ready").status_code == 200, 30, "readiness to return")
    # Uploads that failed fast stopped the worker admitting jobs until storage was back.
    assert fresh.log_lines("storage is down") and fresh.log_lines("storage is back")
