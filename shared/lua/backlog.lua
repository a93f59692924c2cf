-- What an autoscaler reads, per lane: queued are the jobs waiting in its keys' queues or sent
-- and not started (the window), running the jobs started and not ended; O(keys with jobs in the
-- lane) per lane. Every key's jobs in flight are the window's plus the running ones.
--
-- KEYS: none.
-- ARGV[1...]: lanes to report besides every lane that has had a job.
-- Other keys: the lanes t2i:fair:lanes, the API key index t2i:apikeys (once, to seed the
--   lanes' sets of keys), t2i:fair:keys-seeded, and per lane t2i:fair:<lane>:keys,
--   t2i:fair:<lane>:q:<owner>, t2i:fair:<lane>:inflight:<owner>, t2i:fair:<lane>:ahead.
-- Returns: lane, queued, running for each lane, flattened.
--#include fair
--#include event
-- Keys whose jobs were queued before the lanes kept their set of keys: found once, from the index
-- of every API key.
if redis.call('SET', FAIR .. 'keys-seeded', '1', 'NX') then
  local owners = redis.call('SMEMBERS', '{{APIKEY_INDEX}}')
  owners[#owners + 1] = '-'
  for _, lane in ipairs(redis.call('SMEMBERS', '{{LANES_KEY}}')) do
    for _, owner in ipairs(owners) do
      if redis.call('ZCARD', fair_key(lane, 'q:' .. owner)) > 0 or
          redis.call('SCARD', fair_key(lane, 'inflight:' .. owner)) > 0 then
        redis.call('SADD', fair_key(lane, 'keys'), owner)
      end
    end
  end
end
local lanes, seen = {}, {}
for _, lane in ipairs(ARGV) do
  if not seen[lane] then seen[lane] = true; lanes[#lanes + 1] = lane end
end
for _, lane in ipairs(redis.call('SMEMBERS', '{{LANES_KEY}}')) do
  if not seen[lane] then seen[lane] = true; lanes[#lanes + 1] = lane end
end
local counts = {}
for _, lane in ipairs(lanes) do
  local waiting, inflight = 0, 0
  for _, owner in ipairs(redis.call('SMEMBERS', fair_key(lane, 'keys'))) do
    waiting = waiting + redis.call('ZCARD', fair_key(lane, 'q:' .. owner))
    inflight = inflight + redis.call('SCARD', fair_key(lane, 'inflight:' .. owner))
  end
  local window = redis.call('ZCARD', fair_key(lane, 'ahead'))
  counts[#counts + 1] = lane
  counts[#counts + 1] = waiting + window
  counts[#counts + 1] = math.max(inflight - window, 0)
end
return counts
