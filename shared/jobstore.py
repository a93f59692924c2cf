"""Job records in Redis: one hash per job, every state change a compare-and-set in Lua.

Each change also appends an event to the job's stream (resumable SSE) in the same script, so the
stream and the record never disagree.
"""

import hashlib
import json
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import Enum, StrEnum
from typing import Any

from pydantic_core import to_jsonable_python
from redis import Redis

from shared.schema import (
    ALLOWED_TRANSITIONS,
    GenerationRequest,
    JobError,
    JobErrorType,
    JobRecord,
    JobStatus,
)

QUEUE_KEY = "t2i:queue"
# Jobs a worker holds (reserved or rendering), scored by when their lease runs out.
LEASES_KEY = "t2i:leases"
# Jobs sent to the broker that no worker has reserved yet, scored by when they were sent.
DISPATCHED_KEY = "t2i:dispatched"
# The latest send time among reserved jobs, per broker queue: each queue is FIFO, so a job sent
# well before it and still unreserved was passed over (its message is lost).
RESERVED_HIGH_KEY = "t2i:dispatched:reserved-high"
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
local function is_terminal(status)
  return status == 'succeeded' or status == 'failed' or status == 'canceled' or status == 'expired'
end
"""

# KEYS: job, events, queue, owner's index, retention, sequence, idempotency key, dispatched.
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
redis.call('ZADD', KEYS[8], ARGV[2], ARGV[1])
redis.call('ZADD', KEYS[4], seq, ARGV[1])
redis.call('ZADD', KEYS[5], ARGV[2], ARGV[8])
append_event(KEYS[2], 'queued', ARGV[6], ARGV[3])
return {1, seq}
"""

# KEYS: job, events, queue, leases, dispatched. ARGV: job id, event type, event data,
# retention s, fence worker and attempt ('' for no fence), n, the n states the job may be in, then
# field/value pairs. A status change takes the job off the queue; a terminal one ends its lease.
# Returns {1, previous} when written, {0, previous} when not, {0, false} when the job is missing.
_COMPARE_AND_SET = """
local current = redis.call('HGET', KEYS[1], 'status')
if not current then return {0, false} end
if ARGV[5] ~= '' then
  local holder = redis.call('HMGET', KEYS[1], 'worker', 'attempt')
  if holder[1] ~= ARGV[5] or tonumber(holder[2]) ~= tonumber(ARGV[6]) then return {0, current} end
end
local n = tonumber(ARGV[7])
for i = 8, n + 7 do
  if ARGV[i] == current then
    if #ARGV > n + 7 then redis.call('HSET', KEYS[1], unpack(ARGV, n + 8)) end
    if ARGV[2] ~= 'progress' then redis.call('ZREM', KEYS[3], ARGV[1]) end
    if is_terminal(ARGV[2]) then
      redis.call('ZREM', KEYS[4], ARGV[1])
      redis.call('ZREM', KEYS[5], ARGV[1])
    end
    if ARGV[2] == 'canceled' then redis.call('PUBLISH', 'CANCEL_CHANNEL', ARGV[1]) end
    append_event(KEYS[2], ARGV[2], ARGV[3], ARGV[4])
    return {1, current}
  end
end
return {0, current}
"""

# KEYS: job, leases, dispatched, reserved high-water. ARGV: job id, worker (JSON), attempt, lease
# expiry (epoch s). A worker takes one attempt of a queued job that nobody holds.
# Returns {1}, {0} not queued or missing, {-1} another attempt, {-2} held by a worker.
_RESERVE = """
local fields = redis.call('HMGET', KEYS[1], 'status', 'attempt', 'worker')
if fields[1] ~= 'queued' then return {0} end
if tonumber(fields[2]) ~= tonumber(ARGV[3]) then return {-1} end
if fields[3] and fields[3] ~= 'null' then return {-2} end
redis.call('HSET', KEYS[1], 'worker', ARGV[2])
redis.call('ZADD', KEYS[2], ARGV[4], ARGV[1])
local sent = redis.call('ZSCORE', KEYS[3], ARGV[1])
if sent then
  redis.call('ZREM', KEYS[3], ARGV[1])
  if tonumber(sent) > tonumber(redis.call('GET', KEYS[4]) or '0') then
    redis.call('SET', KEYS[4], sent)
  end
end
return {1}
"""

# KEYS: leases, then the n jobs. ARGV: worker (JSON), lease expiry, then n ids and n attempts.
# Returns the ids whose lease this worker no longer holds.
_RENEW = """
local n = #KEYS - 1
local lost = {}
for i = 1, n do
  local fields = redis.call('HMGET', KEYS[i + 1], 'status', 'worker', 'attempt')
  local live = fields[1] == 'queued' or fields[1] == 'running'
  if live and fields[2] == ARGV[1] and tonumber(fields[3]) == tonumber(ARGV[i + 2 + n]) then
    redis.call('ZADD', KEYS[1], ARGV[2], ARGV[i + 2])
  else
    table.insert(lost, ARGV[i + 2])
  end
end
return lost
"""

# KEYS: job, events, queue, leases, dispatched, sequence. ARGV: job id, why ('lapsed': its lease
# ran out; 'lost': its message never reached a worker, sent before ARGV[5]; 'handed_back' by
# worker ARGV[5]), now (epoch s), retention s, ARGV[5], most retries, then the failure's fields
# (error, finished_at, event data) for a job past the cap. Starts the next attempt: queued,
# nobody's, to be sent again. Returns {1, attempt}, {2, attempt} failed, {0} left alone.
_REQUEUE = """
local f = redis.call('HMGET', KEYS[1], 'status', 'attempt', 'worker', 'retries')
if f[1] ~= 'queued' and f[1] ~= 'running' then return {0} end
local why = ARGV[2]
if why == 'lapsed' then
  local lease = redis.call('ZSCORE', KEYS[4], ARGV[1])
  if not lease or tonumber(lease) > tonumber(ARGV[3]) then return {0} end
elseif why == 'lost' then
  if f[1] ~= 'queued' or (f[3] and f[3] ~= 'null') then return {0} end
  local sent = redis.call('ZSCORE', KEYS[5], ARGV[1])
  if not sent or tonumber(sent) > tonumber(ARGV[5]) then return {0} end
elseif f[3] ~= ARGV[5] then
  return {0}
end
local attempt = tonumber(f[2])
local retries = tonumber(f[4] or '0')
if why == 'lapsed' then retries = retries + 1 end
redis.call('ZREM', KEYS[4], ARGV[1])
if why == 'lapsed' and retries > tonumber(ARGV[6]) then
  redis.call('HSET', KEYS[1], 'status', 'failed', 'retries', retries, 'error', ARGV[7],
             'finished_at', ARGV[8])
  redis.call('ZREM', KEYS[3], ARGV[1])
  redis.call('ZREM', KEYS[5], ARGV[1])
  append_event(KEYS[2], 'failed', ARGV[9], ARGV[4])
  return {2, attempt}
end
attempt = attempt + 1
-- Its new message joins the back of the broker queue, so its position does too.
local seq = redis.call('INCR', KEYS[6])
redis.call('HSET', KEYS[1], 'status', 'queued', 'attempt', attempt, 'retries', retries,
           'worker', 'null', 'started_at', 'null', 'progress', 'null')
redis.call('ZADD', KEYS[5], ARGV[3], ARGV[1])
redis.call('ZADD', KEYS[3], seq, ARGV[1])
local data = cjson.encode({status = 'queued', attempt = attempt, reason = why})
append_event(KEYS[2], 'queued', data, ARGV[4])
return {1, attempt}
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
class Holder:
    """A worker and the attempt of a job it holds: what every write of that attempt is fenced on."""

    worker: str
    attempt: int


class Reservation(Enum):
    RESERVED = "reserved"
    NOT_QUEUED = "not queued"
    OTHER_ATTEMPT = "for another attempt"
    HELD = "held by another worker"


class RequeueReason(StrEnum):
    LAPSED = "lapsed"  # its worker stopped renewing the lease
    LOST = "lost"  # its message never reached a worker
    HANDED_BACK = "handed_back"  # a stopping worker gave it back


@dataclass(frozen=True)
class Requeued:
    """What a requeue did: `attempt` is the job's attempt now."""

    requeued: bool
    failed: bool
    attempt: int | None


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
        self._reserve = redis.register_script(_RESERVE)
        self._renew = redis.register_script(_RENEW)
        self._requeue = redis.register_script(_script(_REQUEUE))

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
                DISPATCHED_KEY,
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
        holder: Holder | None = None,
        **fields: Any,
    ) -> CasResult:
        """Move a job to `new_status`, writing `fields`, only from a state that allows it (and,
        with a holder, only while that worker still holds that attempt)."""
        sources = [s for s, targets in ALLOWED_TRANSITIONS.items() if new_status in targets]
        if expected is not None:
            sources = [s for s in sources if s == expected]
        if not sources:
            raise ValueError(f"no state may move to {new_status}")
        return self._compare_and_set(
            job_id, sources, new_status.value, {"status": new_status.value, **fields}, holder
        )

    def expire(self, job_id: str) -> bool:
        """A job that waited in the queue too long ends `expired`; False if it had left it."""
        return self.transition(
            job_id, JobStatus.EXPIRED, expected=JobStatus.QUEUED, finished_at=utc_now()
        ).applied

    def reserve(
        self, job_id: str, attempt: int, worker: str, lease_until: float, queue: str = ""
    ) -> Reservation:
        """Hold one attempt of a queued job for `worker` until `lease_until` (renewed while it
        is held); `queue` is the broker queue its message came from."""
        outcome = self._reserve(
            keys=[job_key(job_id), LEASES_KEY, DISPATCHED_KEY, _reserved_high_key(queue)],
            args=[job_id, json.dumps(worker), attempt, lease_until],
        )
        return {
            1: Reservation.RESERVED,
            0: Reservation.NOT_QUEUED,
            -1: Reservation.OTHER_ATTEMPT,
            -2: Reservation.HELD,
        }[outcome[0]]

    def admit(self, job_id: str, holder: Holder, started_at: datetime) -> CasResult:
        """The reserved job joins a GPU batch: `running` from now on."""
        return self.transition(
            job_id,
            JobStatus.RUNNING,
            expected=JobStatus.QUEUED,
            holder=holder,
            started_at=started_at,
        )

    def renew(self, worker: str, lease_until: float, attempts: dict[str, int]) -> set[str]:
        """Extend the leases of the jobs `worker` holds; the ids it no longer holds."""
        if not attempts:
            return set()
        ids = list(attempts)
        lost = self._renew(
            keys=[LEASES_KEY, *(job_key(job_id) for job_id in ids)],
            args=[json.dumps(worker), lease_until, *ids, *(attempts[job_id] for job_id in ids)],
        )
        return {job_id.decode() for job_id in lost}

    def lapsed_leases(self, now: float, count: int) -> list[str]:
        return [m.decode() for m in self._redis.zrangebyscore(LEASES_KEY, "-inf", now, 0, count)]

    def unreserved_dispatches(self, sent_before: float, count: int) -> list[tuple[str, float]]:
        """Jobs sent before `sent_before` that no worker has reserved, oldest first."""
        members = self._redis.zrangebyscore(
            DISPATCHED_KEY, "-inf", sent_before, 0, count, withscores=True
        )
        return [(member.decode(), score) for member, score in members]

    def latest_reserved_dispatch(self, queue: str = "") -> float:
        """When the most recently sent job that a worker reserved from `queue` was sent."""
        return float(self._redis.get(_reserved_high_key(queue)) or 0)

    def model_of(self, job_id: str) -> str | None:
        """The model a job's request names (None: the deployment's default)."""
        raw = self._redis.hget(job_key(job_id), "request")
        return json.loads(raw).get("model") if raw else None

    def requeue(
        self,
        job_id: str,
        reason: RequeueReason,
        *,
        now: float,
        max_retries: int,
        worker: str = "",
        sent_before: float = 0.0,
    ) -> Requeued:
        """Start the job's next attempt (queued, to be sent again), if `reason` still holds: a
        lapsed lease (counted as a retry; past `max_retries` the job fails as `worker_lost`), a
        message sent before `sent_before` that no worker took, or a hand-back by `worker`."""
        finished_at = utc_now()
        error = JobError(
            type=JobErrorType.WORKER_LOST,
            message=f"the job's worker was lost {max_retries + 1} times; it was not retried again",
        )
        failure = {"status": JobStatus.FAILED.value, "error": error, "finished_at": finished_at}
        outcome = self._requeue(
            keys=[
                job_key(job_id),
                events_key(job_id),
                QUEUE_KEY,
                LEASES_KEY,
                DISPATCHED_KEY,
                SEQUENCE_KEY,
            ],
            args=[
                job_id,
                reason.value,
                now,
                self.retention_s,
                json.dumps(worker) if reason is RequeueReason.HANDED_BACK else sent_before,
                max_retries,
                json.dumps(to_jsonable_python(error)),
                json.dumps(to_jsonable_python(finished_at)),
                json.dumps(to_jsonable_python(failure)),
            ],
        )
        attempt = int(outcome[1]) if len(outcome) > 1 else None
        return Requeued(requeued=outcome[0] == 1, failed=outcome[0] == 2, attempt=attempt)

    def update_progress(self, job_id: str, holder: Holder, **progress: Any) -> CasResult:
        """Record progress, only while the job runs under this holder."""
        return self._compare_and_set(
            job_id, [JobStatus.RUNNING], PROGRESS_EVENT, {"progress": progress}, holder
        )

    def _compare_and_set(
        self,
        job_id: str,
        sources: list[JobStatus],
        event_type: str,
        fields: dict[str, Any],
        holder: Holder | None = None,
    ) -> CasResult:
        event_data = json.dumps(to_jsonable_python(fields))
        applied, previous = self._cas(
            keys=[job_key(job_id), events_key(job_id), QUEUE_KEY, LEASES_KEY, DISPATCHED_KEY],
            args=[
                job_id,
                event_type,
                event_data,
                self.retention_s,
                json.dumps(holder.worker) if holder else "",
                holder.attempt if holder else "",
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
            pipe.zrem(LEASES_KEY, job_id)
            pipe.zrem(DISPATCHED_KEY, job_id)
            pipe.zrem(index_key(owner), job_id)
            pipe.zrem(RETENTION_KEY, _retention_member(owner, job_id))
            pipe.execute()


def _reserved_high_key(queue: str) -> str:
    return f"{RESERVED_HIGH_KEY}:{queue}" if queue else RESERVED_HIGH_KEY


def _retention_member(owner: str | None, job_id: str) -> str:
    return f"{owner or '-'}:{job_id}"


def _decode(raw: dict[bytes, bytes]) -> JobRecord:
    decoded = {
        name.decode(): value.decode() if name == b"status" else json.loads(value)
        for name, value in raw.items()
    }
    return JobRecord.model_validate(decoded)
