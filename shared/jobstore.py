"""Job records in Redis: one hash per job, every state change a compare-and-set in Lua.

Each change also appends an event to the job's stream (resumable SSE) in the same script, so the
stream and the record never disagree.
"""

import json
import logging
import uuid
from dataclasses import dataclass
from datetime import datetime
from enum import Enum, StrEnum
from typing import Any

from pydantic_core import to_jsonable_python
from redis import Redis

from shared.clock import redis_now
from shared.jobscripts import (
    DEFAULT_WORKER_MAX_AGE_S,
    EVENTS_MAXLEN,
    CreateCall,
    Created,
    decode_position,
    fair_scripts,
)
from shared.keys import (
    COMPLETIONS_KEY,
    DISPATCHED_KEY,
    LEASES_KEY,
    QUEUE_KEY,
    RETENTION_KEY,
    SEQUENCE_KEY,
    STATS_KEY,
    events_key,
    index_key,
    job_key,
    preview_key,
    reserved_high_key,
    retention_member,
    status_index_key,
    watermark_key,
)
from shared.provenance import WatermarkPayload
from shared.rates import THROUGHPUT_WINDOW_S, QueueRates, queue_rate_reads
from shared.records import decode_record, encode_fields, utc_now
from shared.schema import (
    ALLOWED_TRANSITIONS,
    TERMINAL_STATES,
    JobError,
    JobErrorType,
    JobRecord,
    JobStatus,
    PreviewOut,
)
from shared.scripts import load_script

log = logging.getLogger(__name__)

TERMINAL_EVENTS = frozenset(status.value for status in TERMINAL_STATES)
PROGRESS_EVENT = "progress"
_EWMA_WEIGHT = 0.2
_REWRITE_END = load_script("rewrite_end")
_RESERVE = load_script("reserve")
_RENEW = load_script("renew_leases")
_RECORD_COMPLETION = load_script("record_completion")
_WRITE_PREVIEW = load_script("write_preview")
# A preview outlives its job's last step by this much at most: a running job replaces it far
# sooner, and a finished one no longer shows it.
PREVIEW_TTL_S = 300


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
        self._write_preview = redis.register_script(_WRITE_PREVIEW)
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
        call = CreateCall.of(
            record, idempotency_key, fingerprint, max_queue_depth, self.retention_s, lane
        )
        return call.outcome(self._create(keys=call.keys, args=call.args))

    def remember_watermark(self, job_id: str) -> None:
        """Map the part of the id a watermark carries back to the job, while the job is kept."""
        prefix = WatermarkPayload.of(job_id, 0).job_id_prefix
        self._redis.set(watermark_key(prefix), job_id, ex=self.retention_s)

    def get(self, job_id: str) -> JobRecord | None:
        raw = self._redis.hgetall(job_key(job_id))
        return decode_record(raw) if raw else None

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
            keys=[job_key(job_id), LEASES_KEY, DISPATCHED_KEY, reserved_high_key(queue)],
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
        return float(self._redis.get(reserved_high_key(queue)) or 0)

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

    def write_preview(self, job_id: str, holder: Holder, preview: PreviewOut) -> bool:
        """Keep the job's latest preview and mark it in its events, only while the job runs
        under this holder."""
        marker = {"step": preview.step, "total": preview.total}
        written = self._write_preview(
            keys=[job_key(job_id), events_key(job_id), preview_key(job_id)],
            args=[
                json.dumps(holder.worker),
                holder.attempt,
                preview.model_dump_json(),
                json.dumps(marker),
                PREVIEW_TTL_S,
                EVENTS_MAXLEN,
                self.retention_s,
            ],
        )
        return written == 1

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
            *encode_fields(fields),
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
        return decode_position(self._positions(args=[job_id])[0])

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
            return [decode_record(raw) if raw else None for raw in pipe.execute()]

    def record_completion(self, job_s: float, finished_at: float | None = None) -> None:
        """Feed the throughput figures that queue ETAs come from; a job that finished now by
        Redis's clock unless `finished_at` says when."""
        self._record_completion(
            keys=[COMPLETIONS_KEY, STATS_KEY],
            args=[
                uuid.uuid4().hex,
                job_s,
                THROUGHPUT_WINDOW_S,
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
                pipe.delete(job_key(job_id), events_key(job_id), preview_key(job_id))
                pipe.zrem(QUEUE_KEY, job_id)
                pipe.zrem(LEASES_KEY, job_id)
                pipe.zrem(DISPATCHED_KEY, job_id)
                pipe.zrem(index_key(owner), job_id)
                for status in JobStatus:
                    pipe.zrem(status_index_key(owner, status), job_id)
            pipe.zrem(RETENTION_KEY, *(retention_member(owner, job_id) for owner, job_id in jobs))
            pipe.execute()
