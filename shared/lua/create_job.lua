-- Creates a queued job, spending a token of its owner's rate-limit bucket first. A job with a
-- lane waits in its key's fair queue; the broker gets it when its turn comes.
--
-- KEYS[1]: the job's record, t2i:job:<id>
-- KEYS[2]: the job's events, t2i:job:<id>:events
-- KEYS[3]: the queue of queued jobs, t2i:queue
-- KEYS[4]: the owner's index, t2i:jobs:<owner>
-- KEYS[5]: the retention set, t2i:retention
-- KEYS[6]: the sequence, t2i:seq
-- KEYS[7]: the idempotency key, t2i:idem:<owner>:<key>
-- KEYS[8]: the jobs sent and not reserved, t2i:dispatched
-- KEYS[9]: the owner's queued index, t2i:jobs:<owner>:queued
-- KEYS[10]: the broker queue (its lane), declared only: the script names it by ARGV[9]
-- KEYS[11]: the owner's rate-limit bucket, t2i:ratelimit:<key id>
-- ARGV[1]: job id; ARGV[2]: created (epoch s); ARGV[3]: retention s
-- ARGV[4]: idempotency value ('' for none); ARGV[5]: idempotency TTL; ARGV[6]: event data
-- ARGV[7]: max queue depth; ARGV[8]: retention member
-- ARGV[9]: the lane ('' to send its message separately)
-- ARGV[10], ARGV[11]: the bucket's capacity (0: no limit) and tokens per second
-- ARGV[12]: the job's priority band; ARGV[13...]: field/value pairs of the record
-- Other keys: the fair-share keys of the fragment fair.lua: t2i:fair:<lane>:{q,inflight}:<owner>,
--   t2i:fair:<lane>:{active,ahead,pass,vt,keys}, t2i:fair:sent, t2i:fair:lanes,
--   t2i:apikey:<key id>, t2i:workers, t2i:worker:<name>, t2i:dispatched, the records
--   t2i:job:<id> of the jobs it sends and the lane's broker list <lane>.
-- Returns: {1, seq, tokens}, {0, existing idempotency value, tokens}, {-1, depth, tokens} when
--   the queue is full, or {-2, 0, tokens} when the bucket is empty (tokens: left in the bucket;
--   a replay spends none).
--#include fair
--#include event
--#include take_token
local tokens = ''
if ARGV[4] ~= '' then
  local existing = redis.call('GET', KEYS[7])
  if existing then return {0, existing, tokens} end
end
if tonumber(ARGV[10]) > 0 then
  local allowed, left = take_token(KEYS[11], tonumber(ARGV[10]), tonumber(ARGV[11]))
  tokens = tostring(left)
  if allowed == 0 then return {-2, 0, tokens} end
end
local depth = redis.call('ZCARD', KEYS[3])
if depth >= tonumber(ARGV[7]) then return {-1, depth, tokens} end
if ARGV[4] ~= '' then redis.call('SET', KEYS[7], ARGV[4], 'EX', ARGV[5]) end
local seq = redis.call('INCR', KEYS[6])
redis.call('HSET', KEYS[1], unpack(ARGV, 13))
redis.call('EXPIRE', KEYS[1], ARGV[3])
redis.call('ZADD', KEYS[3], seq, ARGV[1])
redis.call('ZADD', KEYS[4], seq, ARGV[1])
redis.call('ZADD', KEYS[9], seq, ARGV[1])
redis.call('ZADD', KEYS[5], ARGV[2], ARGV[8])
append_event(KEYS[2], 'queued', ARGV[6], ARGV[3])
if ARGV[9] == '' then
  -- Sent by the caller: from now on the reaper watches for its message.
  redis.call('ZADD', KEYS[8], now_s(), ARGV[1])
else
  local rank = string.format('%.0f', tonumber(ARGV[12]) * {{BAND_SIZE}} + seq)
  redis.call('HSET', KEYS[1], 'lane', cjson.encode(ARGV[9]), 'rank', rank)
  redis.call('SADD', '{{LANES_KEY}}', ARGV[9])
  pump(fair_enqueue(KEYS[1], ARGV[1]))
end
return {1, seq, tokens}
