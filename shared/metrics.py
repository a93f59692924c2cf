"""The one metric both sides count: a job ends in the process that moved it to its final state
(the worker for succeeded and failed, the API for canceled, either for expired)."""

from prometheus_client import Counter

from shared.schema import TERMINAL_STATES, JobStatus

JOBS_FINISHED = Counter(
    "txt2img_jobs_finished_total",
    "Jobs that reached a final state, by outcome, counted by the process that ended them",
    ["outcome"],
)


def count_finished(status: JobStatus) -> None:
    assert status in TERMINAL_STATES, status
    JOBS_FINISHED.labels(outcome=status.value).inc()
