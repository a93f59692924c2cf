-- Moves a job to a new state if it is in one of the states given (and, fenced, held by the given
-- worker and attempt). A status change takes the job off the queue; a terminal one ends its
-- lease; a cancel is published to the workers.
--
-- KEYS[1]: the job's record, t2i:job:<id>
-- KEYS[2]: the job's events, t2i:job:<id>:events
-- KEYS[3]: the queue, t2i:queue
-- KEYS[4]: the leases, t2i:leases
-- KEYS[5]: the jobs sent and not reserved, t2i:dispatched
-- ARGV[1]: job id; ARGV[2]: event type (the new status, or 'progress'); ARGV[3]: event data
-- ARGV[4]: retention s; ARGV[5], ARGV[6]: fence worker and attempt ('' for no fence)
-- ARGV[7]: n; ARGV[8 .. n+7]: the states the job may be in; then field/value pairs
-- Other keys: the owner's indexes t2i:jobs:<owner>[:<status>] (event fragment), and the
--   fair-share keys of the fragment fair.lua: t2i:fair:<lane>:{q,inflight}:<owner>,
--   t2i:fair:<lane>:{active,ahead,pass,vt,keys}, t2i:fair:sent, t2i:fair:lanes,
--   t2i:apikey:<key id>, t2i:workers, t2i:worker:<name>, t2i:dispatched, the records
--   t2i:job:<id> of the jobs it sends and the lane's broker list <lane>.
--   Publishes the job id on the cancel channel t2i:cancel.
-- Returns: {1, previous} when written, {0, previous} when not, {0, false} when the job is missing.
--#include fair
--#include event
local current = redis.call('HGET', KEYS[1], 'status')
if not current then return {0, false} end
if ARGV[5] ~= '' then
  local holder = redis.call('HMGET', KEYS[1], 'worker', 'attempt')
  if holder[1] ~= ARGV[5] or tonumber(holder[2]) ~= tonumber(ARGV[6]) then return {0, current} end
end
local n = tonumber(ARGV[7])
for i = 8, n + 7 do
  if ARGV[i] == current then
    if #ARGV > n + 7 then redis.call('HSET', KEYS[1], unpack(ARGV, n + 8)) end
    if ARGV[2] ~= 'progress' then
      redis.call('ZREM', KEYS[3], ARGV[1])
      move_status(KEYS[1], ARGV[1], current, ARGV[2])
      pump(fair_moved(KEYS[1], ARGV[1], current, ARGV[2]))
    end
    if is_terminal(ARGV[2]) then
      redis.call('ZREM', KEYS[4], ARGV[1])
      redis.call('ZREM', KEYS[5], ARGV[1])
    end
    if ARGV[2] == 'canceled' then redis.call('PUBLISH', '{{CANCEL_CHANNEL}}', ARGV[1]) end
    append_event(KEYS[2], ARGV[2], ARGV[3], ARGV[4])
    return {1, current}
  end
end
return {0, current}
