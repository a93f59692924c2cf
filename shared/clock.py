"""One clock for every deadline that crosses machines: Redis's.

A worker writes its leases and heartbeats, an API judges them; the clocks of two machines may be
seconds apart, so such a time is written and compared against Redis `TIME`, in the script that
writes it or read once by whoever compares. Durations within one process stay on its own
monotonic clock.
"""

from typing import Any

# For a Lua script: a script that calls TIME before it writes needs effects replication, the
# default since Redis 5 and the only mode since 7.
NOW_LUA = """
local function now_s()
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1e6
end
"""


def redis_now(redis: Any) -> float:
    """Redis's time in epoch seconds (a sync client)."""
    seconds, microseconds = redis.time()
    return seconds + microseconds / 1e6
