"""Workers killed, stopped and broken on purpose: no job accepted is lost, none is stored twice."""

import signal
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from shared.queue import WORKERS_KEY
from shared.schema import JobErrorType, JobStatus
from tests.chaos.conftest import (
    TERMINAL,
    Cluster,
    assert_all_succeeded,
    assert_stored_once,
    renders_of,
    succeeded_events,
)
from tests.support import wait_until
from worker.faults import FAIL_ADMISSION, FAIL_PROGRESS_WRITE, HANG_RENDER
from worker.supervisor import EXIT_EXECUTOR_FAILED


def test_a_worker_killed_mid_burst_loses_no_job_stores_none_twice_and_its_old_messages_drop(
    fresh: Cluster,
) -> None:
    doomed, _ = fresh.start_worker(), fresh.start_worker()
    for worker in fresh.workers:
        fresh.wait_ready(worker)
    doomed_name = fresh.worker_name(doomed)
    prompts = [f"burst {n}" for n in range(50)]
    with ThreadPoolExecutor(1) as pool:
        submitted = pool.submit(fresh.submit_burst, prompts)

        def doomed_is_rendering_mid_burst() -> bool:
            held = fresh.held_by(doomed_name)
            running = [record for record in held if record.status is JobStatus.RUNNING]
            return bool(running) and len(fresh.log_lines(" succeeded")) >= 4

        wait_until(doomed_is_rendering_mid_burst, 60, "the doomed worker to render mid-burst")
        lost = {record.id for record in fresh.held_by(doomed_name)}
        fresh.kill(doomed)
        killed_at = time.monotonic()
        # Its leases lapse and the reaper starts new attempts; its unacknowledged messages stay
        # in the broker until this worker restores them (the visibility timeout is 3 s here).
        fresh.start_worker()
        job_ids = submitted.result()

    def lost_jobs_taken_up_again() -> bool:
        records = fresh.records(sorted(lost))
        return all(record.attempt > 1 or record.status in TERMINAL for record in records)

    # The promise: what a dead worker held is back in line at once, and the burst done in a minute.
    wait_until(lost_jobs_taken_up_again, 60 - (time.monotonic() - killed_at), "a new attempt")
    print(f"\nthe lost jobs had new attempts {time.monotonic() - killed_at:.1f} s after the kill")
    records = fresh.wait_terminal(job_ids, 60 - (time.monotonic() - killed_at))
    print(f"{len(job_ids)} jobs all ended {time.monotonic() - killed_at:.1f} s after the kill")
    assert_all_succeeded(records)
    retried = {record.id for record in records if record.attempt > 1}
    # What the killed worker held went to another attempt, unless its end was recorded as it was
    # killed (read from the record: the kill can come before the line saying so reaches the log).
    assert lost - retried == {
        record.id for record in records if record.id in lost and record.worker == doomed_name
    }
    assert retried
    assert_stored_once(fresh, records)
    for record in records:
        assert succeeded_events(fresh, record.id) == 1
        attempts = [line.split(" attempt ")[1].split()[0] for line in renders_of(fresh, record.id)]
        # An attempt renders once; a later attempt only because the one before never finished.
        assert len(attempts) == len(set(attempts)) and str(record.attempt) in attempts
    # The old messages come back and are dropped: each lost job still rendered once, above.
    wait_until(
        lambda: all(
            fresh.log_lines(f"dropping the message of job {job_id} attempt 1")
            for job_id in lost & retried
        ),
        30,
        "the killed worker's old messages to come back and be dropped",
    )


def test_sigterm_finishes_the_running_batch_and_hands_back_what_it_reserved(
    fresh: Cluster,
) -> None:
    # A grace period no loaded test machine runs out of: this test is about a graceful stop.
    stopping = fresh.start_ready_worker(T2I_CONCURRENCY="8", T2I_SHUTDOWN_GRACE_S="120")
    name = fresh.worker_name(stopping)
    job_ids = fresh.submit_burst([f"at sigterm {n}" for n in range(8)], num_inference_steps=20)
    store = fresh.store()

    def split() -> dict[JobStatus, set[str]]:
        held: dict[JobStatus, set[str]] = {JobStatus.RUNNING: set(), JobStatus.QUEUED: set()}
        for record in fresh.records(job_ids):
            if record.worker == name and record.status in held:
                held[record.status].add(record.id)
        return held

    wait_until(lambda: all(split().values()), 60, "a running batch and reserved jobs")
    running = split()[JobStatus.RUNNING]
    assert stopping.popen is not None
    stopping.popen.send_signal(signal.SIGTERM)
    wait_until(lambda: not stopping.alive(), 120, "the worker to stop")
    assert stopping.popen.returncode == 0
    assert fresh.redis().zscore(WORKERS_KEY, name) is None
    after_stop = {record.id: record for record in fresh.records(job_ids)}
    for job_id in running:
        assert after_stop[job_id].status is JobStatus.SUCCEEDED
        assert after_stop[job_id].attempt == 1
    handed_back = {job_id for job_id, record in after_stop.items() if record.attempt == 2}
    assert handed_back, "the worker held no job it had not started"
    assert all(after_stop[job_id].status is JobStatus.QUEUED for job_id in handed_back)
    assert all(after_stop[job_id].worker is None for job_id in handed_back)

    fresh.start_worker()
    records = fresh.wait_terminal(job_ids, 90)
    assert_all_succeeded(records)
    assert {record.id for record in records if record.attempt > 1} == handed_back
    assert store.queue_position(job_ids[0]) is None
    assert_stored_once(fresh, records)


def test_injected_faults_end_only_their_job_and_a_hung_executor_makes_the_worker_exit(
    fresh: Cluster,
) -> None:
    worker = fresh.start_ready_worker(T2I_EXECUTOR_STALL_S="3")
    name = fresh.worker_name(worker)
    prompts = [FAIL_PROGRESS_WRITE, FAIL_ADMISSION, "an ordinary job"]
    job_ids = fresh.submit_burst(prompts)
    progress_fault, admission_fault, ordinary = fresh.wait_terminal(job_ids, 60)
    # A progress write that raises costs the job nothing but its progress events.
    assert progress_fault.status is JobStatus.SUCCEEDED
    assert fresh.log_lines("bookkeeping") and fresh.log_lines("injected fault")
    # An exception on the executor thread, outside the render, fails that job with a type.
    assert admission_fault.status is JobStatus.FAILED
    assert admission_fault.error is not None
    assert admission_fault.error.type is JobErrorType.INTERNAL_ERROR
    assert ordinary.status is JobStatus.SUCCEEDED
    assert worker.alive()

    hung = fresh.submit(HANG_RENDER)
    wait_until(lambda: not worker.alive(), 60, "the worker with a hung executor to exit")
    assert worker.popen is not None and worker.popen.returncode == EXIT_EXECUTOR_FAILED
    assert fresh.redis().zscore(WORKERS_KEY, name) is None
    # The reaper gives the job another attempt; nobody renders it here, so cancel it.
    store = fresh.store()
    wait_until(lambda: store.get(hung).attempt == 2, 30, "the hung job's next attempt")
    with fresh.client() as client:
        canceled: dict[str, Any] = client.post(f"/v1/jobs/{hung}/cancel").json()
    assert canceled["status"] == "canceled"
