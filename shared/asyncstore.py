"""The gateway's job store: creates and reads jobs in Redis without leaving the event loop, through
the same scripts as the sync store in shared/jobstore.py."""

import hashlib
import json
from dataclasses import dataclass, replace
from typing import Any

from redis.asyncio import Redis as AsyncRedis
from redis.exceptions import NoScriptError

from shared.jobscripts import (
    CreateCall,
    Created,
    RateLimit,
    RateLimited,
    decode_position,
    fair_scripts,
)
from shared.keys import (
    idempotency_claim_key,
    index_key,
    job_key,
    preview_key,
    status_index_key,
    watermark_key,
)
from shared.ratelimit import bucket_key
from shared.rates import QueueRates, queue_rate_reads
from shared.records import decode_record
from shared.schema import JobRecord, JobStatus, PreviewOut
from shared.scripts import load_script

_ADMIT = load_script("admit")


def _sha1(script: str) -> str:
    """The name Redis gives a script (EVALSHA's argument)."""
    return hashlib.sha1(script.encode()).hexdigest()


@dataclass(frozen=True)
class Admitted:
    """A submission that may go on: a token spent, or (`earlier` set) none, for the job an earlier
    POST with the same idempotency key made."""

    tokens_left: float | None
    earlier: Created | None = None


@dataclass(frozen=True)
class JobPage:
    jobs: list[JobRecord]
    next_cursor: str | None


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
        keys = [idempotency_claim_key(owner, idempotency_key or ""), bucket_key(rate_limit.key_id)]
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
        call = CreateCall.of(
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

    async def _create_and_read(self, call: "CreateCall", by_text: bool) -> tuple[list[Any], bool]:
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
            replies[1] = decode_position(replies[1][0])
        return replies, replicated

    async def positions(self, job_ids: list[str]) -> list[int | None]:
        """Each queued job's place under the fair order (None once it left the queue)."""
        if not job_ids:
            return []
        return [decode_position(reply) for reply in await self._positions_of(job_ids)]

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
        raw, position = replies[0], decode_position(replies[1][0])
        if not raw:
            return None
        return JobView(decode_record(raw), position, QueueRates.decode(replies))

    async def get(self, job_id: str) -> JobRecord | None:
        raw = await self._redis.hgetall(job_key(job_id))
        return decode_record(raw) if raw else None

    async def preview(self, job_id: str) -> PreviewOut | None:
        """The running job's latest live preview, if it has one."""
        found = await self._redis.get(preview_key(job_id))
        return PreviewOut.model_validate_json(found) if found else None

    async def watermarked_job(self, job_id_prefix: str) -> str | None:
        """The job a watermark names, while it is kept."""
        found = await self._redis.get(watermark_key(job_id_prefix))
        return found.decode() if found else None

    async def forget_idempotency_key(self, owner: str | None, idempotency_key: str) -> None:
        await self._redis.delete(idempotency_claim_key(owner, idempotency_key))

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
                    record = decode_record(raw)
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
