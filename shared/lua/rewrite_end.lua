-- Writes the status a job already has, only so the WAIT after it covers the end written earlier
-- (WAIT counts this connection's writes).
--
-- KEYS[1]: the job's record, t2i:job:<id>
-- ARGV[1]: status; ARGV[2]: worker (JSON); ARGV[3]: attempt
-- Other keys: none.
-- Returns: 1 when rewritten, 0 when the job is no longer in that state for that attempt.
local fields = redis.call('HMGET', KEYS[1], 'status', 'worker', 'attempt')
if fields[1] ~= ARGV[1] or fields[2] ~= ARGV[2] or tonumber(fields[3]) ~= tonumber(ARGV[3]) then
  return 0
end
redis.call('HSET', KEYS[1], 'status', ARGV[1])
return 1
