"""What each API key set through AUTOMATIC1111's routes, in Redis: its options (`POST
/sdapi/v1/options`; `sd_model_checkpoint` picks the model of its later A1111 requests) and the
jobs its A1111 requests are waiting on (what `/sdapi/v1/interrupt` and `/skip` cancel)."""

import json
from typing import Any

from redis import Redis

_PREFIX = "t2i:a1111:"
MODEL_OPTION = "sd_model_checkpoint"
# A job stays listed this long at most, should its request never come back to unlist it.
_JOBS_TTL_S = 86_400


def options_key(key_id: str) -> str:
    """The key's options (a hash): each option's JSON value by its name."""
    return f"{_PREFIX}options:{key_id}"


def jobs_key(key_id: str) -> str:
    """The jobs the key's A1111 requests are waiting on (a set of job ids)."""
    return f"{_PREFIX}jobs:{key_id}"


def read_options(redis: Redis, key_id: str) -> dict[str, Any]:
    stored = redis.hgetall(options_key(key_id))
    return {name.decode(): json.loads(value) for name, value in stored.items()}


def write_options(redis: Redis, key_id: str, options: dict[str, Any]) -> None:
    if options:
        fields = {name: json.dumps(value) for name, value in options.items()}
        redis.hset(options_key(key_id), mapping=fields)


def chosen_model(redis: Redis, key_id: str) -> str | None:
    value = redis.hget(options_key(key_id), MODEL_OPTION)
    model = json.loads(value) if value is not None else None
    return model if isinstance(model, str) else None


def track_job(redis: Redis, key_id: str, job_id: str) -> None:
    pipe = redis.pipeline()
    pipe.sadd(jobs_key(key_id), job_id)
    pipe.expire(jobs_key(key_id), _JOBS_TTL_S)
    pipe.execute()


def untrack_job(redis: Redis, key_id: str, job_id: str) -> None:
    redis.srem(jobs_key(key_id), job_id)


def tracked_jobs(redis: Redis, key_id: str) -> set[str]:
    return {member.decode() for member in redis.smembers(jobs_key(key_id))}
