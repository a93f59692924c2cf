"""The names of the job store's keys in Redis, in one place: the job store, its scripts, the
fair-share scripts and the webhook deliveries all address a job's keys by them."""

from shared.schema import JobStatus

JOB_PREFIX = "t2i:job:"
# Queued jobs, scored by their number in arrival order (from SEQUENCE_KEY).
QUEUE_KEY = "t2i:queue"
# Jobs a worker holds (reserved or rendering), scored by when their lease runs out.
LEASES_KEY = "t2i:leases"
# Jobs sent to the broker that no worker has reserved yet, scored by when they were sent.
DISPATCHED_KEY = "t2i:dispatched"
# The latest send time among reserved jobs, per broker queue: each queue is FIFO, so a job sent
# well before it and still unreserved was passed over (its message is lost).
RESERVED_HIGH_KEY = "t2i:dispatched:reserved-high"
# Every job, as its `retention_member`, scored by when it was created.
RETENTION_KEY = "t2i:retention"
# The counter that numbers new jobs in arrival order.
SEQUENCE_KEY = "t2i:seq"
# Jobs finished within the throughput window, scored by when they finished.
COMPLETIONS_KEY = "t2i:completions"
# Where the id of a job that was canceled is published, for the worker that runs it.
CANCEL_CHANNEL = "t2i:cancel"
# The moving average of seconds per job.
STATS_KEY = "t2i:stats"
# The owners' job indexes (`index_key`), which the event fragment also writes.
INDEX_PREFIX = "t2i:jobs:"
_IDEMPOTENCY_PREFIX = "t2i:idem:"


def job_key(job_id: str) -> str:
    """The job's record (a hash); the job's other keys start with it and a colon."""
    return JOB_PREFIX + job_id


def events_key(job_id: str) -> str:
    """The job's events (a stream), which its SSE stream resumes from."""
    return f"{job_key(job_id)}:events"


def preview_key(job_id: str) -> str:
    """A running job's latest live preview (JSON), replaced by each new one."""
    return f"{JOB_PREFIX}{job_id}:preview"


def index_key(owner: str | None) -> str:
    """The owner's jobs, scored by their number in arrival order."""
    return f"{INDEX_PREFIX}{owner or '-'}"


def status_index_key(owner: str | None, status: JobStatus) -> str:
    """The owner's jobs in one state, scored as in `index_key`."""
    return f"{index_key(owner)}:{status.value}"


def idempotency_claim_key(owner: str | None, key: str) -> str:
    """The job and fingerprint of the first POST with the owner's idempotency `key`."""
    return f"{_IDEMPOTENCY_PREFIX}{owner or '-'}:{key}"


def reserved_high_key(queue: str) -> str:
    """`RESERVED_HIGH_KEY` of one broker queue."""
    return f"{RESERVED_HIGH_KEY}:{queue}" if queue else RESERVED_HIGH_KEY


def retention_member(owner: str | None, job_id: str) -> str:
    """A job's member of `RETENTION_KEY`."""
    return f"{owner or '-'}:{job_id}"


def watermark_key(job_id_prefix: str) -> str:
    """The job whose id starts with this prefix, as an invisible watermark names it."""
    return f"t2i:watermark:{job_id_prefix}"
