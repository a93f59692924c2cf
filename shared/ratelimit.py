"""Per-key token buckets in Redis, refilled continuously; spent inside the script that creates a
job, so a submission is one round trip (shared/lua/fragments/take_token.lua and
peek_tokens.lua)."""

import math
from dataclasses import dataclass


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
