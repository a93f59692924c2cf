-- Each job's position under the fair order: the jobs already in the window ahead of it, its
-- key's jobs ahead of it, and, from every other active key, the jobs its pass lets go first.
-- O(log n) per job plus O(active keys) per call. Writes nothing.
--
-- KEYS: none.
-- ARGV[1...]: job ids.
-- Other keys: the jobs' records t2i:job:<id>, the queue t2i:queue (a job with no lane), and the
--   fair-share keys of fair.lua: t2i:fair:<lane>:{active,ahead,pass,vt,q:<owner>},
--   t2i:apikey:<key id>.
-- Returns: a position per job, -1 once it is not queued.
--#include fair
--#include event
local keys_of = {}
local function active_keys(lane)
  if keys_of[lane] then return keys_of[lane] end
  local list = {}
  local raw = redis.call('ZRANGE', fair_key(lane, 'active'), 0, -1, 'WITHSCORES')
  for i = 1, #raw, 2 do
    local owner = raw[i]
    local weight = key_limits(owner)
    list[#list + 1] = {owner = owner, pass = tonumber(raw[i + 1]), stride = 1 / weight,
                       waiting = redis.call('ZCARD', fair_key(lane, 'q:' .. owner))}
  end
  keys_of[lane] = list
  return list
end
local positions = {}
for i, job_id in ipairs(ARGV) do
  local job = '{{JOB_PREFIX}}' .. job_id
  local position = -1
  if redis.call('HGET', job, 'status') == 'queued' then
    local lane = json_field(job, 'lane')
    if not lane then
      position = redis.call('ZRANK', '{{QUEUE_KEY}}', job_id) or -1
    else
      local ahead = fair_key(lane, 'ahead')
      position = redis.call('ZRANK', ahead, job_id)
      if not position then
        local owner = job_owner(job)
        position = redis.call('ZCARD', ahead)
        local rank = redis.call('ZRANK', fair_key(lane, 'q:' .. owner), job_id)
        if rank then
          local weight = key_limits(owner)
          local pass = tonumber(redis.call('ZSCORE', fair_key(lane, 'active'), owner))
          if not pass then
            pass = math.max(tonumber(redis.call('HGET', fair_key(lane, 'pass'), owner) or '0'),
                            tonumber(redis.call('GET', fair_key(lane, 'vt')) or '0'))
          end
          local target = pass + rank / weight
          position = position + rank
          for _, other in ipairs(active_keys(lane)) do
            if other.owner ~= owner then
              local sent = (target - other.pass) / other.stride
              if other.owner < owner then sent = math.floor(sent + 1e-9) + 1
              else sent = math.ceil(sent - 1e-9) end
              position = position + math.max(0, math.min(sent, other.waiting))
            end
          end
        end
      end
    end
  end
  positions[i] = position
end
return positions
