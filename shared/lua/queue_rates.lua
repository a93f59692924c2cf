-- What queue ETAs come from: the completions in the window and the first and last of their
-- times (never the whole window), the average seconds per job and the live workers, all by
-- Redis's clock (completions and heartbeats are written by it).
--
-- KEYS[1]: the completions, t2i:completions
-- KEYS[2]: the stats, t2i:stats
-- KEYS[3]: the live workers, t2i:workers
-- ARGV[1]: the window s; ARGV[2]: the worker max age s
-- Other keys: none.
-- Returns: {count, first time or false, last time or false, job_s, live workers}.
--#include now
local now = now_s()
local since = now - tonumber(ARGV[1])
local count = redis.call('ZCOUNT', KEYS[1], since, '+inf')
local first = redis.call('ZRANGEBYSCORE', KEYS[1], since, '+inf', 'WITHSCORES', 'LIMIT', 0, 1)
local last = redis.call('ZREVRANGEBYSCORE', KEYS[1], '+inf', since, 'WITHSCORES', 'LIMIT', 0, 1)
local job_s = redis.call('HGET', KEYS[2], 'job_s')
local workers = redis.call('ZCOUNT', KEYS[3], now - tonumber(ARGV[2]), '+inf')
return {count, first[2] or false, last[2] or false, job_s, workers}
