-- Starts the next attempt of a job whose worker or message was lost, or that a worker handed
-- back: queued, nobody's, to be sent again; or fails it once its retries are spent.
--
-- KEYS[1]: the job's record, t2i:job:<id>
-- KEYS[2]: the job's events, t2i:job:<id>:events
-- KEYS[3]: the queue, t2i:queue
-- KEYS[4]: the leases, t2i:leases
-- KEYS[5]: the jobs sent and not reserved, t2i:dispatched
-- KEYS[6]: the sequence, t2i:seq
-- ARGV[1]: job id
-- ARGV[2]: why: 'lapsed' (its lease ran out by Redis's clock), 'lost' (its message never
--   reached a worker, sent before ARGV[4]) or 'handed_back' (by worker ARGV[4])
-- ARGV[3]: retention s; ARGV[4]: see ARGV[2]
-- ARGV[5]: most retries (lapsed and lost attempts both count)
-- ARGV[6], ARGV[7], ARGV[8]: the failure's error, finished_at and event data, for a job past
--   the cap
-- Other keys: the owner's indexes t2i:jobs:<owner>[:<status>] (event fragment), and the
--   fair-share keys of the fragment fair.lua: t2i:fair:<lane>:{q,inflight}:<owner>,
--   t2i:fair:<lane>:{active,ahead,pass,vt,keys}, t2i:fair:sent, t2i:fair:lanes,
--   t2i:apikey:<key id>, t2i:workers, t2i:worker:<name>, t2i:dispatched, the records
--   t2i:job:<id> of the jobs it sends and the lane's broker list <lane>.
-- Returns: {1, attempt, sent} (sent: 1 when its fair queue sends it, 0 when the caller must),
--   {2, attempt} failed, {0} left alone.
--#include fair
--#include event
local f = redis.call('HMGET', KEYS[1], 'status', 'attempt', 'worker', 'retries')
if f[1] ~= 'queued' and f[1] ~= 'running' then return {0} end
local why = ARGV[2]
if why == 'lapsed' then
  local lease = redis.call('ZSCORE', KEYS[4], ARGV[1])
  if not lease or tonumber(lease) > now_s() then return {0} end
elseif why == 'lost' then
  if f[1] ~= 'queued' or (f[3] and f[3] ~= 'null') then return {0} end
  local sent = redis.call('ZSCORE', KEYS[5], ARGV[1])
  if not sent or tonumber(sent) > tonumber(ARGV[4]) then return {0} end
elseif f[3] ~= ARGV[4] then
  return {0}
end
local attempt = tonumber(f[2])
local retries = tonumber(f[4] or '0')
-- A message lost on the way counts as much as a lost worker: a job whose every message is lost
-- must fail in the end, not be sent again forever. A hand-back is a worker stopping cleanly.
local counted = why == 'lapsed' or why == 'lost'
if counted then retries = retries + 1 end
redis.call('ZREM', KEYS[4], ARGV[1])
if counted and retries > tonumber(ARGV[5]) then
  redis.call('HSET', KEYS[1], 'status', 'failed', 'retries', retries, 'error', ARGV[6],
             'finished_at', ARGV[7])
  redis.call('ZREM', KEYS[3], ARGV[1])
  redis.call('ZREM', KEYS[5], ARGV[1])
  move_status(KEYS[1], ARGV[1], f[1], 'failed')
  append_event(KEYS[2], 'failed', ARGV[8], ARGV[3])
  pump(fair_moved(KEYS[1], ARGV[1], f[1], 'failed'))
  return {2, attempt}
end
attempt = attempt + 1
local seq = redis.call('INCR', KEYS[6])
redis.call('HSET', KEYS[1], 'status', 'queued', 'attempt', attempt, 'retries', retries,
           'worker', 'null', 'started_at', 'null', 'progress', 'null')
redis.call('ZADD', KEYS[3], seq, ARGV[1])
move_status(KEYS[1], ARGV[1], f[1], 'queued')
local data = cjson.encode({status = 'queued', attempt = attempt, reason = why})
append_event(KEYS[2], 'queued', data, ARGV[3])
local lane = fair_moved(KEYS[1], ARGV[1], f[1], 'requeued')
if lane then
  -- Back in its key's queue at its old place; sent when its turn comes.
  redis.call('ZREM', KEYS[5], ARGV[1])
  fair_enqueue(KEYS[1], ARGV[1])
  pump(lane)
  return {1, attempt, 1}
end
-- Its new message joins the back of the broker queue, so its position does too.
redis.call('ZADD', KEYS[5], now_s(), ARGV[1])
return {1, attempt, 0}
