-- Records a finished job for the throughput window and the moving average of seconds per job.
--
-- KEYS[1]: the completions, t2i:completions
-- KEYS[2]: the stats, t2i:stats
-- ARGV[1]: a member; ARGV[2]: the job's seconds; ARGV[3]: the window s
-- ARGV[4]: the average's weight; ARGV[5]: the time it finished (epoch s; '' for now by Redis's
--   clock)
-- Other keys: none.
-- Returns: nothing.
--#include now
local now = tonumber(ARGV[5]) or now_s()
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[3]))
local job_s = tonumber(ARGV[2])
local previous = tonumber(redis.call('HGET', KEYS[2], 'job_s'))
if previous then
  local weight = tonumber(ARGV[4])
  job_s = (1 - weight) * previous + weight * job_s
end
redis.call('HSET', KEYS[2], 'job_s', string.format('%.17g', job_s))
