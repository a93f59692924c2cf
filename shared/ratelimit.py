"""Per-key token buckets in Redis, refilled continuously; spent inside the script that creates a
job, so a submission is one round trip."""

import math
from dataclasses import dataclass

# A Lua function for scripts that spend a token: the bucket's key, capacity and tokens per
# second. Returns allowed (1 or 0) and the tokens left.
TAKE_TOKEN_LUA = """
local function take_token(bucket, capacity, rate)
  local now_parts = redis.call('TIME')
  local now = tonumber(now_parts[1]) + tonumber(now_parts[2]) / 1e6
  local tokens = tonumber(redis.call('HGET', bucket, 'tokens') or capacity)
  local last = tonumber(redis.call('HGET', bucket, 'at') or now)
  tokens = math.min(capacity, tokens + math.max(0, now - last) * rate)
  local allowed = 0
  if tokens >= 1 then
    tokens = tokens - 1
    allowed = 1
  end
  redis.call('HSET', bucket, 'tokens', tostring(tokens), 'at', tostring(now))
  redis.call('EXPIRE', bucket, math.ceil(capacity / rate) + 1)
  return allowed, tokens
end
"""


# Beside TAKE_TOKEN_LUA: the tokens a bucket holds now, spending none and writing nothing.
PEEK_TOKENS_LUA = """
local function peek_tokens(bucket, capacity, rate)
  local now_parts = redis.call('TIME')
  local now = tonumber(now_parts[1]) + tonumber(now_parts[2]) / 1e6
  local tokens = tonumber(redis.call('HGET', bucket, 'tokens') or capacity)
  local last = tonumber(redis.call('HGET', bucket, 'at') or now)
  return math.min(capacity, tokens + math.max(0, now - last) * rate)
end
"""


def bucket_key(key_id: str) -> str:
    return f"t2i:ratelimit:{key_id}"


@dataclass(frozen=True)
class Decision:
    allowed: bool
    limit: int
    remaining: int
    reset_s: int
    retry_after_s: int

    @classmethod
    def of(cls, allowed: bool, tokens: float, per_minute: int) -> "Decision":
        """What a bucket `per_minute` deep, refilled over a minute, decided with `tokens` left."""
        rate = per_minute / 60
        return cls(
            allowed=allowed,
            limit=per_minute,
            remaining=math.floor(tokens),
            reset_s=math.ceil((per_minute - tokens) / rate),
            retry_after_s=max(1, math.ceil((1 - tokens) / rate)),
        )

    def headers(self) -> dict[str, str]:
        headers = {
            "RateLimit-Limit": str(self.limit),
            "RateLimit-Remaining": str(self.remaining),
            "RateLimit-Reset": str(self.reset_s),
        }
        if not self.allowed:
            headers["Retry-After"] = str(self.retry_after_s)
        return headers
