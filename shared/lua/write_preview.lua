-- Keeps a running job's latest live preview, only while the given worker and attempt hold the
-- job, and marks it in the job's events. The image is kept once, in the preview key, which each
-- preview replaces; an event carries only its step, so the stream never holds images.
--
-- KEYS[1]: the job's record, t2i:job:<id>
-- KEYS[2]: the job's events, t2i:job:<id>:events
-- KEYS[3]: the job's latest preview, t2i:job:<id>:preview
-- ARGV[1]: fence worker (JSON); ARGV[2]: fence attempt; ARGV[3]: the preview (JSON);
-- ARGV[4]: the event's data (JSON: step, total); ARGV[5]: the preview's ttl s;
-- ARGV[6]: the events' length cap; ARGV[7]: the events' ttl s
-- Other keys: none.
-- Returns: 1 when written, 0 when the job is not running under this worker and attempt.
local job = redis.call('HMGET', KEYS[1], 'status', 'worker', 'attempt')
if job[1] ~= 'running' or job[2] ~= ARGV[1] or tonumber(job[3]) ~= tonumber(ARGV[2]) then
  return 0
end
redis.call('SET', KEYS[3], ARGV[3], 'EX', ARGV[5])
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[6], '*', 'type', 'preview', 'data', ARGV[4])
redis.call('EXPIRE', KEYS[2], ARGV[7])
return 1
