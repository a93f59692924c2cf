-- now_s(): Redis's clock, in epoch seconds. A script that calls TIME before it writes needs
-- effects replication, the default since Redis 5 and the only mode since 7.
local function now_s()
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1e6
end
