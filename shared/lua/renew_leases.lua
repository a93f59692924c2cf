-- Extends a worker's leases on the jobs it still holds.
--
-- KEYS[1]: the leases, t2i:leases
-- KEYS[2 .. n+1]: the n jobs' records, t2i:job:<id>
-- ARGV[1]: worker (JSON); ARGV[2]: lease seconds; ARGV[3 .. n+2]: the n ids;
--   ARGV[n+3 .. 2n+2]: their attempts
-- Other keys: none.
-- Returns: the ids whose lease this worker no longer holds.
--#include now
local n = #KEYS - 1
local lost = {}
local lease_until = now_s() + tonumber(ARGV[2])
for i = 1, n do
  local fields = redis.call('HMGET', KEYS[i + 1], 'status', 'worker', 'attempt')
  local live = fields[1] == 'queued' or fields[1] == 'running'
  if live and fields[2] == ARGV[1] and tonumber(fields[3]) == tonumber(ARGV[i + 2 + n]) then
    redis.call('ZADD', KEYS[1], lease_until, ARGV[i + 2])
  else
    table.insert(lost, ARGV[i + 2])
  end
end
return lost
