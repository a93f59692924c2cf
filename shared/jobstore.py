"""Job records in Redis: one hash per job, every state change a compare-and-set in Lua."""

import json
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from pydantic_core import to_jsonable_python
from redis import Redis

from shared.schema import ALLOWED_TRANSITIONS, JobRecord, JobStatus

JOB_KEY_PREFIX = "t2i:job:"

# ARGV: n, n allowed current states, then field/value pairs to write when the current state is
# one of them. Returns {1, previous} when written, {0, previous} when not, {0, false} if missing.
_COMPARE_AND_SET = """
local current = redis.call('HGET', KEYS[1], 'status')
if not current then return {0, false} end
local n = tonumber(ARGV[1])
for i = 2, n + 1 do
  if ARGV[i] == current then
    if #ARGV > n + 1 then redis.call('HSET', KEYS[1], unpack(ARGV, n + 2)) end
    return {1, current}
  end
end
return {0, current}
"""


def new_job_id() -> str:
    return uuid.uuid4().hex


def utc_now() -> datetime:
    return datetime.now(UTC)


def _job_key(job_id: str) -> str:
    return JOB_KEY_PREFIX + job_id


def _encode_fields(fields: dict[str, Any]) -> dict[str, str]:
    return {
        name: value if name == "status" else json.dumps(value) for name, value in fields.items()
    }


@dataclass(frozen=True)
class CasResult:
    applied: bool
    previous: JobStatus | None


class JobStore:
    """Creates, reads and moves jobs; a terminal job never changes again."""

    def __init__(self, redis: Redis, retention_s: int) -> None:
        self._redis = redis
        self._retention_s = retention_s
        self._cas = redis.register_script(_COMPARE_AND_SET)

    def create(self, record: JobRecord) -> None:
        fields = _encode_fields(record.model_dump(mode="json"))
        key = _job_key(record.id)
        with self._redis.pipeline(transaction=True) as pipe:
            pipe.hset(key, mapping=fields)
            pipe.expire(key, self._retention_s)
            pipe.execute()

    def get(self, job_id: str) -> JobRecord | None:
        raw = self._redis.hgetall(_job_key(job_id))
        if not raw:
            return None
        decoded = {
            name.decode(): value.decode() if name == b"status" else json.loads(value)
            for name, value in raw.items()
        }
        return JobRecord.model_validate(decoded)

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
        payload = {"status": new_status.value, **to_jsonable_python(fields)}
        return self._compare_and_set(job_id, sources, payload)

    def update_if(self, job_id: str, status: JobStatus, **fields: Any) -> CasResult:
        """Write `fields` only while the job is in `status` (progress of a running job, say)."""
        return self._compare_and_set(job_id, [status], to_jsonable_python(fields))

    def _compare_and_set(
        self, job_id: str, sources: list[JobStatus], fields: dict[str, Any]
    ) -> CasResult:
        flat: list[str] = []
        for name, value in _encode_fields(fields).items():
            flat.extend((name, value))
        applied, previous = self._cas(
            keys=[_job_key(job_id)], args=[len(sources), *[s.value for s in sources], *flat]
        )
        return CasResult(
            applied=bool(applied), previous=JobStatus(previous.decode()) if previous else None
        )
