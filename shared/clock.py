"""One clock for every deadline that crosses machines: Redis's.

A worker writes its leases and heartbeats, an API judges them; the clocks of two machines may be
seconds apart, so such a time is written and compared against Redis `TIME`, in the script that
writes it (shared/lua/fragments/now.lua) or read once by whoever compares. Durations within one
process stay on its own monotonic clock.
"""

from typing import Any


def redis_now(redis: Any) -> float:
    """Redis's time in epoch seconds (a sync client)."""
    seconds, microseconds = redis.time()
    return seconds + microseconds / 1e6
