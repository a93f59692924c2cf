"""Job records in Redis: one hash per job, every state change a compare-and-set in Lua.

Each change also appends an event to the job's stream (resumable SSE) in the same script, so the
stream and the record never disagree.
"""

import hashlib
import json
import logging
import uuid
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from enum import Enum, StrEnum
from typing import Any

from pydantic_core import to_jsonable_python
from redis import Redis
from redis.asyncio import Redis as AsyncRedis
from redis.exceptions import NoScriptError

from shared.apikeys import KEY_INDEX
from shared.clock import redis_now
from shared.fairshare import BAND_SIZE, LANES_KEY, PRIORITY_BANDS, fair_constants
from shared.keys import job_key
from shared.queue import WORKERS_KEY
from shared.ratelimit import bucket_key
from shared.schema import (
    ALLOWED_TRANSITIONS,
    TERMINAL_STATES,
    GenerationRequest,
    JobError,
    JobErrorType,
    JobRecord,
    JobStatus,
)
from shared.scripts import load_script

log = logging.getLogger(__name__)

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
# A finished job's events stay this long, for a client that resumes its stream late; the job's
# record stays for the whole retention (most of a job's memory was its events).
FINISHED_EVENTS_TTL_S = 600
TERMINAL_EVENTS = frozenset(status.value for status in TERMINAL_STATES)
PROGRESS_EVENT = "progress"
_INDEX_PREFIX = "t2i:jobs:"
_IDEMPOTENCY_PREFIX = "t2i:idem:"
_THROUGHPUT_WINDOW_S = 120.0
# How long a silent worker still counts toward the dispatch window (the API's default for /ready).
DEFAULT_WORKER_MAX_AGE_S = 30.0
_EWMA_WEIGHT = 0.2

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
    "INDEX_PREFIX": _INDEX_PREFIX,
}
_ADMIT = load_script("admit")
_REWRITE_END = load_script("rewrite_end")
_RESERVE = load_script("reserve")
_RENEW = load_script("renew_leases")
_RATES = load_script("queue_rates")
_RECORD_COMPLETION = load_script("record_completion")


def fair_scripts(worker_max_age_s: float = DEFAULT_WORKER_MAX_AGE_S) -> dict[str, str]:
    """The scripts that pass jobs through the fair queues, by file name, for a dispatch window
    that counts workers heard from within `worker_max_age_s`."""
    fair = fair_constants(worker_max_age_s, DISPATCHED_KEY)
    return {
        name: load_script(name, **fair, **_EVENT_CONSTANTS, **own)
        for name, own in _FAIR_SCRIPTS.items()
    }


def _sha1(script: str) -> str:
    """The name Redis gives a script (EVALSHA's argument)."""
    return hashlib.sha1(script.encode()).hexdigest()


def new_job_id() -> str:
    return uuid.uuid4().hex


def utc_now() -> datetime:
    return datetime.now(UTC)


def events_key(job_id: str) -> str:
    return f"{job_key(job_id)}:events"


def index_key(owner: str | None) -> str:
    return f"{_INDEX_PREFIX}{owner or '-'}"


def status_index_key(owner: str | None, status: JobStatus) -> str:
    """The owner's jobs in one state, scored as in `index_key`."""
    return f"{index_key(owner)}:{status.value}"


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
    # False when a job's end is on the primary but fewer replicas than asked confirmed it.
    replicated: bool = True


@dataclass(frozen=True)
class LaneBacklog:
    """A lane's jobs: `queued` not yet started (in their keys' queues or sent to a worker),
    `running` started and not ended."""

    queued: int
    running: int


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
    # True when its fair queue sends the new attempt; otherwise the caller sends it.
    sent: bool = False


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


@dataclass(frozen=True)
class Admitted:
    """A submission that may go on: a token spent, or (`earlier` set) none, for the job an earlier
    POST with the same idempotency key made."""

    tokens_left: float | None
    earlier: Created | None = None


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
class JobPage:
    jobs: list[JobRecord]
    next_cursor: str | None


@dataclass(frozen=True)
class QueueRates:
    """What queue ETAs come from, read once per request in O(1) Redis reads."""

    # Jobs finished per second lately, and the average seconds per job; None when unknown.
    rate: float | None
    job_s: float | None
    live_workers: int

    def eta_s(self, position: int) -> float | None:
        """Seconds until a job with `position` jobs ahead finishes."""
        if self.rate:
            return round((position + 1) / self.rate, 2)
        if self.job_s is None:
            return None
        return round((position + 1) * self.job_s / max(self.live_workers, 1), 2)

    @classmethod
    def decode(cls, replies: list[Any]) -> "QueueRates":
        """From the replies to what `queue_rate_reads` queued, the last of them."""
        count, first, last, job_s, workers = replies[-1]
        rate = None
        if count >= 2 and first and last:
            span = float(last) - float(first)
            if span > 0:
                rate = (count - 1) / span
        return cls(rate, float(job_s) if job_s is not None else None, int(workers))


def queue_rate_reads(pipe: Any, worker_max_age_s: float) -> None:
    """Queue on `pipe` (sync or async) the one read `QueueRates.decode` takes."""
    keys = (COMPLETIONS_KEY, STATS_KEY, WORKERS_KEY)
    # The script's text each time: a pipeline cannot load it first, and it is short.
    pipe.eval(_RATES, len(keys), *keys, _THROUGHPUT_WINDOW_S, worker_max_age_s)


@dataclass(frozen=True)
class _CreateCall:
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
    ) -> "_CreateCall":
        fingerprint = fingerprint or request_fingerprint(record.request)
        claim = json.dumps({"job_id": record.id, "fingerprint": fingerprint})
        keys = [
            job_key(record.id),
            events_key(record.id),
            QUEUE_KEY,
            index_key(record.owner),
            RETENTION_KEY,
            SEQUENCE_KEY,
            _idempotency_key(record.owner, idempotency_key or ""),
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
            _retention_member(record.owner, record.id),
            lane,
            rate_limit.per_minute if rate_limit else 0,
            rate_limit.per_minute / 60 if rate_limit else 0,
            PRIORITY_BANDS[record.request.priority],
            *_encode_fields(record.model_dump(mode="json")),
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


class JobStore:
    """Creates, reads, lists and moves jobs; a terminal job never changes again."""

    def __init__(
        self,
        redis: Redis,
        retention_s: int,
        worker_max_age_s: float = DEFAULT_WORKER_MAX_AGE_S,
        replica_wait: tuple[int, int] | None = None,
    ) -> None:
        """`replica_wait`: the replicas and milliseconds of the WAIT after each write that ends
        a job, so a failover does not undo it (the `redisconn.wait_args` of the settings)."""
        self._redis = redis
        self.retention_s = retention_s
        self._replica_wait = replica_wait
        scripts = fair_scripts(worker_max_age_s)
        self._create = redis.register_script(scripts["create_job"])
        self._cas = redis.register_script(scripts["compare_and_set"])
        self._reserve = redis.register_script(_RESERVE)
        self._renew = redis.register_script(_RENEW)
        self._requeue = redis.register_script(scripts["requeue"])
        self._positions = redis.register_script(scripts["positions"])
        self._pump = redis.register_script(scripts["pump"])
        self._backlog = redis.register_script(scripts["backlog"])
        self._record_completion = redis.register_script(_RECORD_COMPLETION)
        self._rewrite_end = redis.register_script(_REWRITE_END)

    def create(
        self,
        record: JobRecord,
        idempotency_key: str | None = None,
        fingerprint: str | None = None,
        max_queue_depth: int = 2**31,
        lane: str = "",
    ) -> Created:
        """Store a new queued job; with an idempotency key, only if the key is new. With a
        `lane` (a broker queue), the job waits for its fair turn to be sent there.

        Raises QueueFull when `max_queue_depth` jobs are already queued.
        """
        call = _CreateCall.of(
            record, idempotency_key, fingerprint, max_queue_depth, self.retention_s, lane
        )
        return call.outcome(self._create(keys=call.keys, args=call.args))

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
        self, job_id: str, attempt: int, worker: str, lease_s: float, queue: str = ""
    ) -> Reservation:
        """Hold one attempt of a queued job for `worker` for `lease_s` from now by Redis's clock
        (renewed while it is held); `queue` is the broker queue its message came from."""
        outcome = self._reserve(
            keys=[job_key(job_id), LEASES_KEY, DISPATCHED_KEY, _reserved_high_key(queue)],
            args=[job_id, json.dumps(worker), attempt, lease_s],
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

    def renew(self, worker: str, lease_s: float, attempts: dict[str, int]) -> set[str]:
        """Extend the leases of the jobs `worker` holds to `lease_s` from now by Redis's clock;
        the ids it no longer holds."""
        if not attempts:
            return set()
        ids = list(attempts)
        lost = self._renew(
            keys=[LEASES_KEY, *(job_key(job_id) for job_id in ids)],
            args=[json.dumps(worker), lease_s, *ids, *(attempts[job_id] for job_id in ids)],
        )
        return {job_id.decode() for job_id in lost}

    def now(self) -> float:
        """Redis's clock, which every lease, heartbeat and send time is written by."""
        return redis_now(self._redis)

    def lapsed_leases(self, now: float, count: int) -> list[str]:
        """Jobs whose lease ran out by `now` (Redis's clock: `now()`)."""
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
        max_retries: int,
        worker: str = "",
        sent_before: float = 0.0,
    ) -> Requeued:
        """Start the job's next attempt (queued, to be sent again), if `reason` still holds: a
        lease lapsed by Redis's clock, a message sent before `sent_before` that no worker took
        (each counted as a retry; past `max_retries` the job fails as `worker_lost`), or a
        hand-back by `worker`."""
        finished_at = utc_now()
        lost = (
            "the job's message never reached a worker"
            if reason is RequeueReason.LOST
            else "the job's worker was lost"
        )
        error = JobError(
            type=JobErrorType.WORKER_LOST,
            message=f"{lost}; the job was lost {max_retries + 1} times and is not sent again",
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
                self.retention_s,
                json.dumps(worker) if reason is RequeueReason.HANDED_BACK else sent_before,
                max_retries,
                json.dumps(to_jsonable_python(error)),
                json.dumps(to_jsonable_python(finished_at)),
                json.dumps(to_jsonable_python(failure)),
            ],
        )
        attempt = int(outcome[1]) if len(outcome) > 1 else None
        sent = len(outcome) > 2 and outcome[2] == 1
        return Requeued(
            requeued=outcome[0] == 1, failed=outcome[0] == 2, attempt=attempt, sent=sent
        )

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
        keys = [job_key(job_id), events_key(job_id), QUEUE_KEY, LEASES_KEY, DISPATCHED_KEY]
        args = [
            job_id,
            event_type,
            event_data,
            self.retention_s,
            json.dumps(holder.worker) if holder else "",
            holder.attempt if holder else "",
            len(sources),
            *[s.value for s in sources],
            *_encode_fields(fields),
        ]
        if self._replica_wait is None or event_type not in TERMINAL_EVENTS:
            applied, previous = self._cas(keys=keys, args=args)
        else:
            # The WAIT must follow the write on the same connection: one pipeline.
            with self._redis.pipeline(transaction=False) as pipe:
                self._cas(keys=keys, args=args, client=pipe)
                pipe.execute_command("WAIT", *self._replica_wait)
                (applied, previous), acknowledged = pipe.execute()
            if applied and acknowledged < self._replica_wait[0]:
                log.warning(
                    "job %s is %s on %d of %d replicas: a failover now could undo it",
                    job_id,
                    event_type,
                    acknowledged,
                    self._replica_wait[0],
                )
                return CasResult(
                    applied=True, previous=JobStatus(previous.decode()), replicated=False
                )
        return CasResult(
            applied=bool(applied), previous=JobStatus(previous.decode()) if previous else None
        )

    def confirm_end(self, job_id: str, status: JobStatus, holder: Holder) -> CasResult | None:
        """Whether the job ended `status` under this holder (an end whose answer was lost, or
        that no replica confirmed in time), and whether the replicas asked for hold it now;
        None when it did not end so."""
        args = [status.value, json.dumps(holder.worker), holder.attempt]
        if self._replica_wait is None:
            ours = self._rewrite_end(keys=[job_key(job_id)], args=args)
            return CasResult(applied=True, previous=None) if ours else None
        with self._redis.pipeline(transaction=False) as pipe:
            self._rewrite_end(keys=[job_key(job_id)], args=args, client=pipe)
            pipe.execute_command("WAIT", *self._replica_wait)
            ours, acknowledged = pipe.execute()
        if not ours:
            return None
        return CasResult(
            applied=True, previous=None, replicated=acknowledged >= self._replica_wait[0]
        )

    def queue_position(self, job_id: str) -> int | None:
        """How many queued jobs will start before this one; None once it has left the queue."""
        return _position(self._positions(args=[job_id])[0])

    def pump(self) -> int:
        """Fill every lane's dispatch window (a worker that joins, a missed trigger); the number
        of jobs sent."""
        return int(self._pump())

    def backlog(self, lanes: list[str]) -> dict[str, LaneBacklog]:
        """The jobs of each of `lanes` and of every lane that has had a job, in one script."""
        flat = self._backlog(args=lanes)
        return {
            lane.decode(): LaneBacklog(int(queued), int(running))
            for lane, queued, running in zip(flat[::3], flat[1::3], flat[2::3], strict=True)
        }

    def queue_depth(self) -> int:
        return self._redis.zcard(QUEUE_KEY)

    def oldest_queued(self, count: int, start: int = 0) -> list[str]:
        members = self._redis.zrange(QUEUE_KEY, start, start + count - 1)
        return [member.decode() for member in members]

    def get_many(self, job_ids: list[str]) -> list[JobRecord | None]:
        with self._redis.pipeline(transaction=False) as pipe:
            for job_id in job_ids:
                pipe.hgetall(job_key(job_id))
            return [_decode(raw) if raw else None for raw in pipe.execute()]

    def record_completion(self, job_s: float, finished_at: float | None = None) -> None:
        """Feed the throughput figures that queue ETAs come from; a job that finished now by
        Redis's clock unless `finished_at` says when."""
        self._record_completion(
            keys=[COMPLETIONS_KEY, STATS_KEY],
            args=[
                uuid.uuid4().hex,
                job_s,
                _THROUGHPUT_WINDOW_S,
                _EWMA_WEIGHT,
                "" if finished_at is None else finished_at,
            ],
        )

    def queue_rates(self, worker_max_age_s: float) -> "QueueRates":
        with self._redis.pipeline(transaction=False) as pipe:
            queue_rate_reads(pipe, worker_max_age_s)
            return QueueRates.decode(pipe.execute())

    def expired_for_retention(self, before: float, count: int) -> list[tuple[str | None, str]]:
        """(owner, job id) of jobs created before `before`."""
        members = self._redis.zrangebyscore(RETENTION_KEY, "-inf", before, start=0, num=count)
        pairs = [member.decode().rpartition(":") for member in members]
        return [(owner if owner != "-" else None, job_id) for owner, _, job_id in pairs]

    def retention_backlog(self, now: float) -> tuple[int, float]:
        """(jobs past their retention and not yet deleted, how long past it the oldest is)."""
        before = now - self.retention_s
        with self._redis.pipeline(transaction=False) as pipe:
            pipe.zcount(RETENTION_KEY, "-inf", before)
            pipe.zrange(RETENTION_KEY, 0, 0, withscores=True)
            count, oldest = pipe.execute()
        lag = before - oldest[0][1] if oldest else 0.0
        return count, max(0.0, lag)

    def delete(self, owner: str | None, job_id: str) -> None:
        self.delete_many([(owner, job_id)])

    def delete_many(self, jobs: list[tuple[str | None, str]]) -> None:
        """Delete these (owner, job id) jobs and every index entry of theirs, in one round trip."""
        if not jobs:
            return
        with self._redis.pipeline(transaction=True) as pipe:
            for owner, job_id in jobs:
                pipe.delete(job_key(job_id), events_key(job_id))
                pipe.zrem(QUEUE_KEY, job_id)
                pipe.zrem(LEASES_KEY, job_id)
                pipe.zrem(DISPATCHED_KEY, job_id)
                pipe.zrem(index_key(owner), job_id)
                for status in JobStatus:
                    pipe.zrem(status_index_key(owner, status), job_id)
            pipe.zrem(RETENTION_KEY, *(_retention_member(owner, job_id) for owner, job_id in jobs))
            pipe.execute()


@dataclass(frozen=True)
class JobView:
    """A job with what its answer shows while it waits: its queue position and the rates."""

    record: JobRecord
    position: int | None
    rates: QueueRates


class AsyncJobStore:
    """The gateway's request path: creates and reads jobs without leaving the event loop, each in
    one round trip."""

    def __init__(
        self,
        redis: AsyncRedis,
        retention_s: int,
        worker_max_age_s: float,
        replica_wait: tuple[int, int] | None = None,
    ) -> None:
        """`replica_wait`: the replicas and milliseconds of the WAIT that follows a new job
        before it is answered (`redisconn.wait_args`); `Created.replicated` says whether it was
        met."""
        self._redis = redis
        self.retention_s = retention_s
        self._replica_wait = replica_wait
        self._worker_max_age_s = worker_max_age_s
        scripts = fair_scripts(worker_max_age_s)
        self._create_script = scripts["create_job"]
        self._positions_script = scripts["positions"]
        # Redis names a script by the SHA1 of its text, so these never change and no request waits
        # on a load (nor sees another unset them): a call that finds the scripts gone (a restart,
        # a failover, SCRIPT FLUSH) sends their text instead, which loads them again.
        self._create_sha = _sha1(self._create_script)
        self._positions_sha = _sha1(self._positions_script)
        self._admit_script = _ADMIT
        self._admit_sha = _sha1(self._admit_script)

    async def admit(
        self, owner: str | None, idempotency_key: str | None, rate_limit: RateLimit
    ) -> Admitted:
        """Before anything costly: the job an earlier POST with this idempotency key made, if any
        (spending no token), or else a token of the caller's bucket spent. Raises RateLimited."""
        keys = [_idempotency_key(owner, idempotency_key or ""), bucket_key(rate_limit.key_id)]
        args = ["1" if idempotency_key else "0", rate_limit.per_minute, rate_limit.per_minute / 60]
        try:
            reply = await self._redis.evalsha(self._admit_sha, len(keys), *keys, *args)
        except NoScriptError:
            reply = await self._redis.eval(self._admit_script, len(keys), *keys, *args)
        outcome, value, left = reply
        tokens = float(left) if left else None
        if outcome == -2:
            raise RateLimited(float(left))
        if outcome == 1:
            return Admitted(tokens)
        earlier = json.loads(value)
        return Admitted(tokens, Created(False, earlier["job_id"], earlier["fingerprint"], tokens))

    async def create(
        self,
        record: JobRecord,
        idempotency_key: str | None,
        fingerprint: str,
        max_queue_depth: int,
        lane: str,
        rate_limit: RateLimit | None,
    ) -> tuple[Created, JobView | None]:
        """Spend a token of the caller's bucket (none with no `rate_limit`: `admit` spent it),
        store a new queued job in its key's fair queue of `lane` (sent to that broker queue at
        once if its turn has come), all in one script; in the same round trip, what its answer
        shows (None unless it was created). Raises RateLimited or QueueFull."""
        call = _CreateCall.of(
            record,
            idempotency_key,
            fingerprint,
            max_queue_depth,
            self.retention_s,
            lane,
            rate_limit,
        )
        replies, replicated = await self._create_and_read(call, by_text=False)
        if isinstance(replies[0], NoScriptError):
            # The script did not run, so it can run again.
            replies, replicated = await self._create_and_read(call, by_text=True)
        if isinstance(replies[0], Exception):
            raise replies[0]
        created = call.outcome(replies[0])
        if not created.created:
            return created, None
        if not replicated:
            created = replace(created, replicated=False)
        if isinstance(replies[1], NoScriptError):
            # Flushed between the two scripts: the job is stored, only its place is still to read.
            [replies[1]] = await self.positions([call.job_id])
        return created, JobView(record, replies[1], QueueRates.decode(replies))

    async def _create_and_read(self, call: "_CreateCall", by_text: bool) -> tuple[list[Any], bool]:
        """The create script's reply, the job's queue position and the queue's rates, a reply
        that failed as its exception, and whether the replicas asked for confirmed it; `by_text`
        sends the scripts themselves, not their hashes."""
        async with self._redis.pipeline(transaction=False) as pipe:
            if by_text:
                pipe.eval(self._create_script, len(call.keys), *call.keys, *call.args)
            else:
                pipe.evalsha(self._create_sha, len(call.keys), *call.keys, *call.args)
            if self._replica_wait is not None:
                pipe.execute_command("WAIT", *self._replica_wait)
            if by_text:
                pipe.eval(self._positions_script, 0, call.job_id)
            else:
                pipe.evalsha(self._positions_sha, 0, call.job_id)
            queue_rate_reads(pipe, self._worker_max_age_s)
            replies = await pipe.execute(raise_on_error=False)
        replicated = True
        if self._replica_wait is not None:
            acknowledged = replies.pop(1)
            if isinstance(acknowledged, Exception):
                raise acknowledged
            # Short of it the job is still on the primary, which answers for it: refusing it
            # would make a client without an idempotency key submit it again.
            replicated = acknowledged >= self._replica_wait[0]
        if not isinstance(replies[1], Exception):
            replies[1] = _position(replies[1][0])
        return replies, replicated

    async def positions(self, job_ids: list[str]) -> list[int | None]:
        """Each queued job's place under the fair order (None once it left the queue)."""
        if not job_ids:
            return []
        return [_position(reply) for reply in await self._positions_of(job_ids)]

    async def _positions_of(self, job_ids: list[str]) -> list[Any]:
        try:
            return await self._redis.evalsha(self._positions_sha, 0, *job_ids)
        except NoScriptError:
            return await self._redis.eval(self._positions_script, 0, *job_ids)

    async def read(self, job_id: str) -> JobView | None:
        """The job, its queue position and the queue's rates, in one round trip."""
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.hgetall(job_key(job_id))
            pipe.evalsha(self._positions_sha, 0, job_id)
            queue_rate_reads(pipe, self._worker_max_age_s)
            replies = await pipe.execute(raise_on_error=False)
        if isinstance(replies[1], NoScriptError):
            replies[1] = await self._positions_of([job_id])
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply
        raw, position = replies[0], _position(replies[1][0])
        if not raw:
            return None
        return JobView(_decode(raw), position, QueueRates.decode(replies))

    async def get(self, job_id: str) -> JobRecord | None:
        raw = await self._redis.hgetall(job_key(job_id))
        return _decode(raw) if raw else None

    async def forget_idempotency_key(self, owner: str | None, idempotency_key: str) -> None:
        await self._redis.delete(_idempotency_key(owner, idempotency_key))

    async def page(
        self, owner: str | None, limit: int, cursor: str | None, status: JobStatus | None
    ) -> JobPage:
        """The owner's jobs, newest first, from the index of `status` (or of all its jobs): a page
        reads about `limit` records whatever the depth, and is never empty while jobs remain.
        `cursor` is the `next_cursor` of the page before."""
        index = status_index_key(owner, status) if status else index_key(owner)
        upper = f"({int(cursor)}" if cursor else "+inf"
        jobs: list[JobRecord] = []
        while len(jobs) < limit:
            window = await self._redis.zrevrangebyscore(
                index, upper, "-inf", start=0, num=limit - len(jobs), withscores=True
            )
            if not window:
                return JobPage(jobs, None)
            async with self._redis.pipeline(transaction=False) as pipe:
                for job_id, _ in window:
                    pipe.hgetall(job_key(job_id.decode()))
                records = await pipe.execute()
            # A record may be gone (past its retention) or have changed state since the index
            # was read; it is left out, and the next window fills its place.
            for raw in records:
                if raw:
                    record = _decode(raw)
                    if status is None or record.status is status:
                        jobs.append(record)
            upper = f"({int(window[-1][1])}"
        more = await self._redis.zcount(index, "-inf", upper) > 0
        return JobPage(jobs, upper[1:] if more else None)

    async def key_counts(self, owner: str | None) -> tuple[int, int]:
        """(queued, running) jobs of one key, from its status indexes."""
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.zcard(status_index_key(owner, JobStatus.QUEUED))
            pipe.zcard(status_index_key(owner, JobStatus.RUNNING))
            queued, running = await pipe.execute()
        return int(queued), int(running)

    async def queue_views(self, records: list[JobRecord]) -> list[JobView]:
        """Each record with its queue position (while queued), and the rates read once for all."""
        queued = [record.id for record in records if record.status is JobStatus.QUEUED]
        positions = dict(zip(queued, await self.positions(queued), strict=True))
        rates = await self.rates()
        return [JobView(record, positions.get(record.id), rates) for record in records]

    async def rates(self) -> QueueRates:
        async with self._redis.pipeline(transaction=False) as pipe:
            queue_rate_reads(pipe, self._worker_max_age_s)
            return QueueRates.decode(await pipe.execute())


def _position(reply: int) -> int | None:
    return None if reply < 0 else int(reply)


def _reserved_high_key(queue: str) -> str:
    return f"{RESERVED_HIGH_KEY}:{queue}" if queue else RESERVED_HIGH_KEY


def _retention_member(owner: str | None, job_id: str) -> str:
    return f"{owner or '-'}:{job_id}"


def _decode(raw: dict[bytes, bytes]) -> JobRecord:
    # Each field but the status is stored as JSON: the record is one JSON document, parsed once.
    fields = b",".join(
        b'"%s":"%s"' % (name, value) if name == b"status" else b'"%s":%s' % (name, value)
        for name, value in raw.items()
    )
    return JobRecord.model_validate_json(b"{" + fields + b"}")
