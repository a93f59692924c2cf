-- A worker takes one attempt of a queued job that nobody holds; the lease runs out that long
-- after now by Redis's clock (the reaper judges it by the same clock).
--
-- KEYS[1]: the job's record, t2i:job:<id>
-- KEYS[2]: the leases, t2i:leases
-- KEYS[3]: the jobs sent and not reserved, t2i:dispatched
-- KEYS[4]: the reserved high-water mark, t2i:dispatched:reserved-high
-- ARGV[1]: job id; ARGV[2]: worker (JSON); ARGV[3]: attempt; ARGV[4]: lease seconds
-- Other keys: none.
-- Returns: {1} reserved, {0} not queued or missing, {-1} another attempt, {-2} held by a worker.
--#include now
local fields = redis.call('HMGET', KEYS[1], 'status', 'attempt', 'worker')
if fields[1] ~= 'queued' then return {0} end
if tonumber(fields[2]) ~= tonumber(ARGV[3]) then return {-1} end
if fields[3] and fields[3] ~= 'null' then return {-2} end
redis.call('HSET', KEYS[1], 'worker', ARGV[2])
redis.call('ZADD', KEYS[2], now_s() + tonumber(ARGV[4]), ARGV[1])
local sent = redis.call('ZSCORE', KEYS[3], ARGV[1])
if sent then
  redis.call('ZREM', KEYS[3], ARGV[1])
  if tonumber(sent) > tonumber(redis.call('GET', KEYS[4]) or '0') then
    redis.call('SET', KEYS[4], sent)
  end
end
return {1}
