"""Per-key token buckets in Redis, refilled continuously; one atomic script per request."""

import math
from dataclasses import dataclass

from redis.asyncio import Redis as AsyncRedis

# KEYS: the bucket. ARGV: capacity, tokens per second. Returns {allowed, tokens left as a string}.
_TAKE = """
local now_parts = redis.call('TIME')
local now = tonumber(now_parts[1]) + tonumber(now_parts[2]) / 1e6
local capacity = tonumber(ARGV[1])
local rate = tonumber(ARGV[2])
local tokens = tonumber(redis.call('HGET', KEYS[1], 'tokens') or capacity)
local last = tonumber(redis.call('HGET', KEYS[1], 'at') or now)
tokens = math.min(capacity, tokens + math.max(0, now - last) * rate)
local allowed = 0
if tokens >= 1 then
  tokens = tokens - 1
  allowed = 1
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'at', tostring(now))
redis.call('EXPIRE', KEYS[1], math.ceil(capacity / rate) + 1)
return {allowed, tostring(tokens)}
"""


@dataclass(frozen=True)
class Decision:
    allowed: bool
    limit: int
    remaining: int
    reset_s: int
    retry_after_s: int

    def headers(self) -> dict[str, str]:
        headers = {
            "RateLimit-Limit": str(self.limit),
            "RateLimit-Remaining": str(self.remaining),
            "RateLimit-Reset": str(self.reset_s),
        }
        if not self.allowed:
            headers["Retry-After"] = str(self.retry_after_s)
        return headers


class RateLimiter:
    def __init__(self, redis: AsyncRedis) -> None:
        self._take = redis.register_script(_TAKE)

    async def take(self, key_id: str, per_minute: int) -> Decision:
        """Spend one token of the key's bucket: `per_minute` deep, refilled over a minute."""
        rate = per_minute / 60
        allowed, left = await self._take(keys=[f"t2i:ratelimit:{key_id}"], args=[per_minute, rate])
        tokens = float(left)
        return Decision(
            allowed=bool(allowed),
            limit=per_minute,
            remaining=math.floor(tokens),
            reset_s=math.ceil((per_minute - tokens) / rate),
            retry_after_s=max(1, math.ceil((1 - tokens) / rate)),
        )
