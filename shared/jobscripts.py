"""The job store's scripts that both stores run: those that pass a job through the fair queues,
built for a dispatch window, and the create script's call and what its reply means."""

import json
from dataclasses import dataclass
from typing import Any

from shared.apikeys import KEY_INDEX
from shared.fairshare import BAND_SIZE, LANES_KEY, PRIORITY_BANDS, fair_constants
from shared.keys import (
    CANCEL_CHANNEL,
    DISPATCHED_KEY,
    INDEX_PREFIX,
    QUEUE_KEY,
    RETENTION_KEY,
    SEQUENCE_KEY,
    events_key,
    idempotency_claim_key,
    index_key,
    job_key,
    retention_member,
    status_index_key,
)
from shared.ratelimit import bucket_key
from shared.records import encode_fields, request_fingerprint
from shared.schema import JobRecord, JobStatus
from shared.scripts import load_script

IDEMPOTENCY_TTL_S = 24 * 3600
EVENTS_MAXLEN = 1000
# A finished job's events stay this long, for a client that resumes its stream late; the job's
# record stays for the whole retention (most of a job's memory was its events).
FINISHED_EVENTS_TTL_S = 600
# How long a silent worker still counts toward the dispatch window (the API's default for /ready).
DEFAULT_WORKER_MAX_AGE_S = 30.0

# The job store's scripts that pass a job through the fair queues, with the constants of each
# one's own text; every one also carries the fair-share and event fragments.
_FAIR_SCRIPTS: dict[str, dict[str, str | int]] = {
    "create_job": {"LANES_KEY": LANES_KEY, "BAND_SIZE": BAND_SIZE},
    "compare_and_set": {"CANCEL_CHANNEL": CANCEL_CHANNEL},
    "requeue": {},
    "positions": {"QUEUE_KEY": QUEUE_KEY},
    "pump": {"LANES_KEY": LANES_KEY},
    "backlog": {"LANES_KEY": LANES_KEY, "APIKEY_INDEX": KEY_INDEX},
}
_EVENT_CONSTANTS = {
    "EVENTS_MAXLEN": EVENTS_MAXLEN,
    "FINISHED_EVENTS_TTL": FINISHED_EVENTS_TTL_S,
    "INDEX_PREFIX": INDEX_PREFIX,
}


def fair_scripts(worker_max_age_s: float = DEFAULT_WORKER_MAX_AGE_S) -> dict[str, str]:
    """The scripts that pass jobs through the fair queues, by file name, for a dispatch window
    that counts workers heard from within `worker_max_age_s`."""
    fair = fair_constants(worker_max_age_s, DISPATCHED_KEY)
    return {
        name: load_script(name, **fair, **_EVENT_CONSTANTS, **own)
        for name, own in _FAIR_SCRIPTS.items()
    }


@dataclass(frozen=True)
class Created:
    """A new job, or (`created` false) the job an earlier POST with the same key made."""

    created: bool
    job_id: str
    fingerprint: str
    # Left in the caller's bucket, when a rate limit was spent.
    tokens_left: float | None = None
    # False when fewer replicas than asked confirmed the new job in time: it is on the primary only.
    replicated: bool = True


class QueueFull(Exception):
    def __init__(self, depth: int, tokens_left: float | None = None) -> None:
        super().__init__(f"{depth} jobs are queued")
        self.depth = depth
        self.tokens_left = tokens_left


class RateLimited(Exception):
    def __init__(self, tokens_left: float) -> None:
        super().__init__(f"{tokens_left} tokens left")
        self.tokens_left = tokens_left


@dataclass(frozen=True)
class RateLimit:
    """The caller's token bucket, spent by the script that creates its job."""

    key_id: str
    per_minute: int


@dataclass(frozen=True)
class CreateCall:
    """The create script's keys and arguments for one job, and how to read its answer."""

    keys: list[str]
    args: list[Any]
    job_id: str
    fingerprint: str

    @classmethod
    def of(
        cls,
        record: JobRecord,
        idempotency_key: str | None,
        fingerprint: str | None,
        max_queue_depth: int,
        retention_s: int,
        lane: str = "",
        rate_limit: RateLimit | None = None,
    ) -> "CreateCall":
        fingerprint = fingerprint or request_fingerprint(record.request)
        claim = json.dumps({"job_id": record.id, "fingerprint": fingerprint})
        keys = [
            job_key(record.id),
            events_key(record.id),
            QUEUE_KEY,
            index_key(record.owner),
            RETENTION_KEY,
            SEQUENCE_KEY,
            idempotency_claim_key(record.owner, idempotency_key or ""),
            DISPATCHED_KEY,
            status_index_key(record.owner, JobStatus.QUEUED),
            lane or QUEUE_KEY,
            bucket_key(rate_limit.key_id if rate_limit else "-"),
        ]
        args = [
            record.id,
            record.created_at.timestamp(),
            retention_s,
            claim if idempotency_key else "",
            IDEMPOTENCY_TTL_S,
            json.dumps({"status": JobStatus.QUEUED.value}),
            max_queue_depth,
            retention_member(record.owner, record.id),
            lane,
            rate_limit.per_minute if rate_limit else 0,
            rate_limit.per_minute / 60 if rate_limit else 0,
            PRIORITY_BANDS[record.request.priority],
            *encode_fields(record.model_dump(mode="json")),
        ]
        return cls(keys, args, record.id, fingerprint)

    def outcome(self, reply: list[Any]) -> Created:
        outcome, value, left = reply
        tokens = float(left) if left else None
        if outcome == -2:
            raise RateLimited(float(left))
        if outcome == -1:
            raise QueueFull(int(value), tokens)
        if outcome == 1:
            return Created(True, self.job_id, self.fingerprint, tokens)
        earlier = json.loads(value)
        return Created(False, earlier["job_id"], earlier["fingerprint"], tokens)


def decode_position(reply: int) -> int | None:
    """A job's place in the reply of the positions script; None once it left the queue."""
    return None if reply < 0 else int(reply)
