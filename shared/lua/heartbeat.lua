-- A worker's heartbeat, stamped by Redis's clock, as every API that judges the age of a
-- heartbeat reads it; forgets workers silent for longer than ARGV[2].
--
-- KEYS[1]: the live workers, t2i:workers
-- ARGV[1]: this worker; ARGV[2]: how long a silent worker is remembered (s)
-- Other keys: none.
-- Returns: nothing.
--#include now
local now = now_s()
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[2]))
