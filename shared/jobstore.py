"""Job records in Redis: one hash per job, every state change a compare-and-set in Lua.

Each change also appends an event to the job's stream (resumable SSE) in the same script, so the
stream and the record never disagree.
"""

import hashlib
import json
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from pydantic_core import to_jsonable_python
from redis import Redis

from shared.schema import ALLOWED_TRANSITIONS, GenerationRequest, JobRecord, JobStatus

QUEUE_KEY = "t2i:queue"
RETENTION_KEY = "t2i:retention"
SEQUENCE_KEY = "t2i:seq"
COMPLETIONS_KEY = "t2i:completions"
CANCEL_CHANNEL = "t2i:cancel"
STATS_KEY = "t2i:stats"
IDEMPOTENCY_TTL_S = 24 * 3600
EVENTS_MAXLEN = 1000
PROGRESS_EVENT = "progress"
_JOB_PREFIX = "t2i:job:"
_IDEMPOTENCY_PREFIX = "t2i:idem:"
_THROUGHPUT_WINDOW_S = 120.0
_EWMA_WEIGHT = 0.2
# A filtered listing reads at most this many windows of the index per page.
_MAX_LIST_WINDOWS = 20

_EVENT = """
local function append_event(stream, event_type, data, ttl)
  redis.call('XADD', stream, 'MAXLEN', '~', ARGV_MAXLEN, '*', 'type', event_type, 'data', data)
  redis.call('EXPIRE', stream, ttl)
end
"""

# KEYS: job, events, queue, owner's index, retention, sequence, idempotency key.
# ARGV: job id, created (epoch s), retention s, idempotency value ('' for none), idempotency TTL,
# event data, max queue depth, retention member, then field/value pairs.
# Returns {1, seq}, {0, existing idempotency value}, or {-1, depth} when the queue is full.
_CREATE = """
if ARGV[4] ~= '' then
  local existing = redis.call('GET', KEYS[7])
  if existing then return {0, existing} end
end
local depth = redis.call('ZCARD', KEYS[3])
if depth >= tonumber(ARGV[7]) then return {-1, depth} end
if ARGV[4] ~= '' then redis.call('SET', KEYS[7], ARGV[4], 'EX', ARGV[5]) end
local seq = redis.call('INCR', KEYS[6])
redis.call('HSET', KEYS[1], unpack(ARGV, 9))
redis.call('EXPIRE', KEYS[1], ARGV[3])
redis.call('ZADD', KEYS[3], seq, ARGV[1])
redis.call('ZADD', KEYS[4], seq, ARGV[1])
redis.call('ZADD', KEYS[5], ARGV[2], ARGV[8])
append_event(KEYS[2], 'queued', ARGV[6], ARGV[3])
return {1, seq}
"""

# KEYS: job, events, queue. ARGV: job id, event type, event data, retention s, n, the n states
# the job may be in, then field/value pairs. A status change takes the job off the queue.
# Returns {1, previous} when written, {0, previous} when not, {0, false} when the job is missing.
_COMPARE_AND_SET = """
local current = redis.call('HGET', KEYS[1], 'status')
if not current then return {0, false} end
local n = tonumber(ARGV[5])
for i = 6, n + 5 do
  if ARGV[i] == current then
    if #ARGV > n + 5 then redis.call('HSET', KEYS[1], unpack(ARGV, n + 6)) end
    if ARGV[2] ~= 'progress' then redis.call('ZREM', KEYS[3], ARGV[1]) end
    if ARGV[2] == 'canceled' then redis.call('PUBLISH', 'CANCEL_CHANNEL', ARGV[1]) end
    append_event(KEYS[2], ARGV[2], ARGV[3], ARGV[4])
    return {1, current}
  end
end
return {0, current}
"""


# KEYS: job, events. ARGV: the dead worker, the new worker, started_at (JSON), retention s.
# Moves a running job to a new worker only if the one that claimed it is still on record.
_RECLAIM = """
if redis.call('HGET', KEYS[1], 'status') ~= 'running' then return 0 end
if redis.call('HGET', KEYS[1], 'worker') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'worker', ARGV[2], 'started_at', ARGV[3], 'progress', 'null')
append_event(KEYS[2], 'running', cjson.encode({reclaimed_from = cjson.decode(ARGV[1])}), ARGV[4])
return 1
"""


def _script(body: str) -> str:
    script = _EVENT.replace("ARGV_MAXLEN", str(EVENTS_MAXLEN)) + body
    return script.replace("CANCEL_CHANNEL", CANCEL_CHANNEL)


def new_job_id() -> str:
    return uuid.uuid4().hex


def utc_now() -> datetime:
    return datetime.now(UTC)


def job_key(job_id: str) -> str:
    return _JOB_PREFIX + job_id


def events_key(job_id: str) -> str:
    return f"{_JOB_PREFIX}{job_id}:events"


def index_key(owner: str | None) -> str:
    return f"t2i:jobs:{owner or '-'}"


def _idempotency_key(owner: str | None, key: str) -> str:
    return f"{_IDEMPOTENCY_PREFIX}{owner or '-'}:{key}"


def request_fingerprint(request: GenerationRequest) -> str:
    """Same body, same fingerprint: the normalized request as the client sent it."""
    canonical = json.dumps(request.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def _encode_fields(fields: dict[str, Any]) -> list[str]:
    flat: list[str] = []
    for name, value in to_jsonable_python(fields).items():
        flat.extend((name, value if name == "status" else json.dumps(value)))
    return flat


@dataclass(frozen=True)
class CasResult:
    applied: bool
    previous: JobStatus | None


@dataclass(frozen=True)
class Created:
    """A new job, or (`created` false) the job an earlier POST with the same key made."""

    created: bool
    job_id: str
    fingerprint: str


class QueueFull(Exception):
    def __init__(self, depth: int) -> None:
        super().__init__(f"{depth} jobs are queued")
        self.depth = depth


@dataclass(frozen=True)
class JobPage:
    jobs: list[JobRecord]
    next_cursor: str | None


class JobStore:
    """Creates, reads, lists and moves jobs; a terminal job never changes again."""

    def __init__(self, redis: Redis, retention_s: int) -> None:
        self._redis = redis
        self.retention_s = retention_s
        self._create = redis.register_script(_script(_CREATE))
        self._cas = redis.register_script(_script(_COMPARE_AND_SET))
        self._reclaim = redis.register_script(_script(_RECLAIM))

    def create(
        self,
        record: JobRecord,
        idempotency_key: str | None = None,
        fingerprint: str | None = None,
        max_queue_depth: int = 2**31,
    ) -> Created:
        """Store a new queued job; with an idempotency key, only if the key is new.

        Raises QueueFull when `max_queue_depth` jobs are already queued.
        """
        fingerprint = fingerprint or request_fingerprint(record.request)
        claim = json.dumps({"job_id": record.id, "fingerprint": fingerprint})
        outcome, value = self._create(
            keys=[
                job_key(record.id),
                events_key(record.id),
                QUEUE_KEY,
                index_key(record.owner),
                RETENTION_KEY,
                SEQUENCE_KEY,
                _idempotency_key(record.owner, idempotency_key or ""),
            ],
            args=[
                record.id,
                record.created_at.timestamp(),
                self.retention_s,
                claim if idempotency_key else "",
                IDEMPOTENCY_TTL_S,
                json.dumps({"status": JobStatus.QUEUED.value}),
                max_queue_depth,
                _retention_member(record.owner, record.id),
                *_encode_fields(record.model_dump(mode="json")),
            ],
        )
        if outcome == -1:
            raise QueueFull(int(value))
        if outcome == 1:
            return Created(True, record.id, fingerprint)
        earlier = json.loads(value)
        return Created(False, earlier["job_id"], earlier["fingerprint"])

    def forget_idempotency_key(self, owner: str | None, idempotency_key: str) -> None:
        self._redis.delete(_idempotency_key(owner, idempotency_key))

    def get(self, job_id: str) -> JobRecord | None:
        raw = self._redis.hgetall(job_key(job_id))
        return _decode(raw) if raw else None

    def status(self, job_id: str) -> JobStatus | None:
        value = self._redis.hget(job_key(job_id), "status")
        return JobStatus(value.decode()) if value else None

    def transition(
        self,
        job_id: str,
        new_status: JobStatus,
        *,
        expected: JobStatus | None = None,
        **fields: Any,
    ) -> CasResult:
        """Move a job to `new_status`, writing `fields`, only from a state that allows it."""
        sources = [s for s, targets in ALLOWED_TRANSITIONS.items() if new_status in targets]
        if expected is not None:
            sources = [s for s in sources if s == expected]
        if not sources:
            raise ValueError(f"no state may move to {new_status}")
        return self._compare_and_set(
            job_id, sources, new_status.value, {"status": new_status.value, **fields}
        )

    def expire(self, job_id: str) -> bool:
        """A job that waited in the queue too long ends `expired`; False if it had left it."""
        return self.transition(
            job_id, JobStatus.EXPIRED, expected=JobStatus.QUEUED, finished_at=utc_now()
        ).applied

    def reclaim(
        self, job_id: str, dead_worker: str | None, worker: str, started_at: datetime
    ) -> bool:
        """Take over a running job whose worker died; False if anyone else changed it first."""
        reclaimed = self._reclaim(
            keys=[job_key(job_id), events_key(job_id)],
            args=[
                json.dumps(dead_worker),
                json.dumps(worker),
                json.dumps(started_at.isoformat()),
                self.retention_s,
            ],
        )
        return bool(reclaimed)

    def update_progress(self, job_id: str, **progress: Any) -> CasResult:
        """Record progress, only while the job runs."""
        return self._compare_and_set(
            job_id, [JobStatus.RUNNING], PROGRESS_EVENT, {"progress": progress}
        )

    def _compare_and_set(
        self, job_id: str, sources: list[JobStatus], event_type: str, fields: dict[str, Any]
    ) -> CasResult:
        event_data = json.dumps(to_jsonable_python(fields))
        applied, previous = self._cas(
            keys=[job_key(job_id), events_key(job_id), QUEUE_KEY],
            args=[
                job_id,
                event_type,
                event_data,
                self.retention_s,
                len(sources),
                *[s.value for s in sources],
                *_encode_fields(fields),
            ],
        )
        return CasResult(
            applied=bool(applied), previous=JobStatus(previous.decode()) if previous else None
        )

    def queue_position(self, job_id: str) -> int | None:
        """How many queued jobs are ahead of this one; None once it has left the queue."""
        return self._redis.zrank(QUEUE_KEY, job_id)

    def oldest_queued(self, count: int) -> list[str]:
        return [member.decode() for member in self._redis.zrange(QUEUE_KEY, 0, count - 1)]

    def page(
        self, owner: str | None, limit: int, cursor: str | None, status: JobStatus | None
    ) -> JobPage:
        """The owner's jobs, newest first; `cursor` is the `next_cursor` of the page before."""
        index = index_key(owner)
        upper = f"({int(cursor)}" if cursor else "+inf"
        jobs: list[JobRecord] = []
        scanned_to: float | None = None
        for _ in range(_MAX_LIST_WINDOWS):
            if len(jobs) == limit:
                break
            window = self._redis.zrevrangebyscore(
                index, upper, "-inf", start=0, num=max(limit, 50), withscores=True
            )
            if not window:
                return JobPage(jobs, None)
            with self._redis.pipeline(transaction=False) as pipe:
                for job_id, _ in window:
                    pipe.hgetall(job_key(job_id.decode()))
                records = pipe.execute()
            for (_, score), raw in zip(window, records, strict=True):
                scanned_to = score
                if raw:
                    record = _decode(raw)
                    if status is None or record.status is status:
                        jobs.append(record)
                        if len(jobs) == limit:
                            break
            upper = f"({int(scanned_to)}"
        more = self._redis.zcount(index, "-inf", upper) > 0
        return JobPage(jobs, str(int(scanned_to)) if more and scanned_to is not None else None)

    def record_completion(self, job_s: float, now: float) -> None:
        """Feed the throughput figures that queue ETAs come from."""
        with self._redis.pipeline(transaction=False) as pipe:
            pipe.zadd(COMPLETIONS_KEY, {uuid.uuid4().hex: now})
            pipe.zremrangebyscore(COMPLETIONS_KEY, "-inf", now - _THROUGHPUT_WINDOW_S)
            pipe.hget(STATS_KEY, "job_s")
            previous = pipe.execute()[-1]
        average = (
            job_s
            if previous is None
            else ((1 - _EWMA_WEIGHT) * float(previous) + _EWMA_WEIGHT * job_s)
        )
        self._redis.hset(STATS_KEY, "job_s", average)

    def throughput(self, now: float) -> tuple[float | None, float | None]:
        """(jobs finished per second lately, average seconds per job), each None if unknown."""
        with self._redis.pipeline(transaction=False) as pipe:
            pipe.zrangebyscore(COMPLETIONS_KEY, now - _THROUGHPUT_WINDOW_S, "+inf", withscores=True)
            pipe.hget(STATS_KEY, "job_s")
            recent, job_s = pipe.execute()
        rate = None
        if len(recent) >= 2:
            span = recent[-1][1] - recent[0][1]
            if span > 0:
                rate = (len(recent) - 1) / span
        return rate, float(job_s) if job_s is not None else None

    def expired_for_retention(self, before: float, count: int) -> list[tuple[str | None, str]]:
        """(owner, job id) of jobs created before `before`."""
        members = self._redis.zrangebyscore(RETENTION_KEY, "-inf", before, start=0, num=count)
        pairs = [member.decode().rpartition(":") for member in members]
        return [(owner if owner != "-" else None, job_id) for owner, _, job_id in pairs]

    def delete(self, owner: str | None, job_id: str) -> None:
        with self._redis.pipeline(transaction=True) as pipe:
            pipe.delete(job_key(job_id), events_key(job_id))
            pipe.zrem(QUEUE_KEY, job_id)
            pipe.zrem(index_key(owner), job_id)
            pipe.zrem(RETENTION_KEY, _retention_member(owner, job_id))
            pipe.execute()


def _retention_member(owner: str | None, job_id: str) -> str:
    return f"{owner or '-'}:{job_id}"


def _decode(raw: dict[bytes, bytes]) -> JobRecord:
    decoded = {
        name.decode(): value.decode() if name == b"status" else json.loads(value)
        for name, value in raw.items()
    }
    return JobRecord.model_validate(decoded)
