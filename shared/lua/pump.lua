-- Fills every lane's dispatch window from its keys' fair queues.
--
-- KEYS: none.
-- ARGV: none.
-- Other keys: the fair-share keys of the fragment fair.lua: t2i:fair:<lane>:{q,inflight}:<owner>,
--   t2i:fair:<lane>:{active,ahead,pass,vt,keys}, t2i:fair:sent, t2i:fair:lanes,
--   t2i:apikey:<key id>, t2i:workers, t2i:worker:<name>, t2i:dispatched, the records
--   t2i:job:<id> of the jobs it sends and the lane's broker list <lane>.
-- Returns: how many jobs it sent.
--#include fair
--#include event
local sent = 0
for _, lane in ipairs(redis.call('SMEMBERS', '{{LANES_KEY}}')) do
  local before = redis.call('ZCARD', fair_key(lane, 'ahead'))
  pump(lane)
  sent = sent + redis.call('ZCARD', fair_key(lane, 'ahead')) - before
end
return sent
