-- The fair share of the worker pool between API keys (shared/fairshare.py), for every job store
-- script: fair_key, json_field, job_owner, key_limits, at_cap, activate, send, window, pump,
-- fair_enqueue, fair_moved.
-- Touches, besides the job records {{JOB_PREFIX}}<id> and API key records
-- {{APIKEY_PREFIX}}<key id>: per lane, {{FAIR_PREFIX}}<lane>:q:<owner>, :inflight:<owner>, :active,
-- :ahead, :pass, :vt and :keys; {{FAIR_PREFIX}}sent; the live workers {{WORKERS_KEY}} and their
-- {{WORKER_INFO_PREFIX}}<name>; the jobs sent {{DISPATCHED_KEY}}; and the lane's broker list
-- (named as the lane) that a job's Celery message is pushed onto.
local FAIR = '{{FAIR_PREFIX}}'
local function fair_key(lane, part) return FAIR .. lane .. ':' .. part end
--#include now
local function json_field(job, name)
  local raw = redis.call('HGET', job, name)
  if not raw then return nil end
  local value = cjson.decode(raw)
  if value == cjson.null then return nil end
  return value
end
local function job_owner(job) return json_field(job, 'owner') or '-' end
local function key_limits(owner)
  local f = redis.call('HMGET', '{{APIKEY_PREFIX}}' .. owner, 'weight', 'max_running')
  local weight = tonumber(f[1]) or 1
  if weight <= 0 then weight = 1 end
  return weight, tonumber(f[2]) or 0
end
local function at_cap(lane, owner, max_running)
  return max_running > 0 and
    redis.call('SCARD', fair_key(lane, 'inflight:' .. owner)) >= max_running
end
-- A key with jobs waiting and room under its cap joins the active set, at the pass of the
-- last job sent (or its own, if that is later).
local function activate(lane, owner)
  if redis.call('ZCARD', fair_key(lane, 'q:' .. owner)) == 0 then return end
  local active = fair_key(lane, 'active')
  if redis.call('ZSCORE', active, owner) then return end
  local _, max_running = key_limits(owner)
  if at_cap(lane, owner, max_running) then return end
  local pass = tonumber(redis.call('HGET', fair_key(lane, 'pass'), owner) or '0')
  local vt = tonumber(redis.call('GET', fair_key(lane, 'vt')) or '0')
  redis.call('ZADD', active, math.max(pass, vt), owner)
end
local B64 = 'ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/'
local function base64(data)
  local out = {}
  for i = 1, #data, 3 do
    local a, b, c = data:byte(i, i + 2)
    local n = a * 65536 + (b or 0) * 256 + (c or 0)
    local d1, d2 = math.floor(n / 262144) % 64, math.floor(n / 4096) % 64
    local d3, d4 = math.floor(n / 64) % 64, n % 64
    out[#out + 1] = B64:sub(d1 + 1, d1 + 1) .. B64:sub(d2 + 1, d2 + 1) ..
      (b and B64:sub(d3 + 1, d3 + 1) or '=') .. (c and B64:sub(d4 + 1, d4 + 1) or '=')
  end
  return table.concat(out)
end
local MESSAGE = [==[{{MESSAGE_TEMPLATE}}]==]
local BODY = [==[{{BODY_TEMPLATE}}]==]
-- The broker's Redis transport takes a message as a push onto the queue's list.
local function send(lane, job_id, attempt, now)
  local n = redis.call('INCR', FAIR .. 'sent')
  local task_id = job_id .. '.' .. attempt .. '.' .. n
  local body = BODY:gsub('@JOB@', job_id):gsub('@ATTEMPT@', attempt)
  local message = MESSAGE:gsub('@BODY@', base64(body)):gsub('@JOB@', job_id)
  message = message:gsub('@ATTEMPT@', attempt):gsub('@TASK@', task_id)
  message = message:gsub('@TAG@', 'd.' .. task_id):gsub('@QUEUE@', lane)
  redis.call('LPUSH', lane, message)
  redis.call('ZADD', '{{DISPATCHED_KEY}}', now, job_id)
  redis.call('ZADD', fair_key(lane, 'ahead'), now, job_id)
end
-- About one batch per live worker may wait in the broker or in a worker's hands, unstarted.
local function window()
  local names = redis.call('ZRANGEBYSCORE', '{{WORKERS_KEY}}', now_s() - {{WORKER_MAX_AGE}}, '+inf')
  local slots = 0
  for _, name in ipairs(names) do
    local info = redis.call('GET', '{{WORKER_INFO_PREFIX}}' .. name)
    if info then slots = slots + (tonumber(cjson.decode(info).max_batch_images) or 1) end
  end
  return math.max(slots, 1)
end
-- Fill the lane's window from the active keys, lowest pass first.
local function pump(lane)
  if not lane then return end
  local limit = window()
  local ahead, active = fair_key(lane, 'ahead'), fair_key(lane, 'active')
  local now = now_s()
  while redis.call('ZCARD', ahead) < limit do
    local top = redis.call('ZRANGE', active, 0, 0, 'WITHSCORES')
    if #top == 0 then return end
    local owner, pass = top[1], tonumber(top[2])
    local queue = fair_key(lane, 'q:' .. owner)
    local head = redis.call('ZRANGE', queue, 0, 0)
    local next_pass = pass
    if #head > 0 then
      local job_id = head[1]
      redis.call('ZREM', queue, job_id)
      local f = redis.call('HMGET', '{{JOB_PREFIX}}' .. job_id, 'status', 'attempt', 'worker')
      if f[1] == 'queued' and (not f[3] or f[3] == 'null') then
        send(lane, job_id, tonumber(f[2]), now)
        redis.call('SADD', fair_key(lane, 'inflight:' .. owner), job_id)
        redis.call('SET', fair_key(lane, 'vt'), pass)
        local weight = key_limits(owner)
        next_pass = pass + 1 / weight
      end
    end
    local _, max_running = key_limits(owner)
    if redis.call('ZCARD', queue) == 0 or at_cap(lane, owner, max_running) then
      redis.call('ZREM', active, owner)
      redis.call('HSET', fair_key(lane, 'pass'), owner, next_pass)
    else
      redis.call('ZADD', active, next_pass, owner)
    end
  end
end
-- A queued job joins its key's queue (again, after a lost attempt: at its old place).
local function fair_enqueue(job, job_id)
  local lane = json_field(job, 'lane')
  if not lane then return nil end
  local owner = job_owner(job)
  local rank = redis.call('HGET', job, 'rank')
  redis.call('ZADD', fair_key(lane, 'q:' .. owner), rank, job_id)
  redis.call('SADD', fair_key(lane, 'keys'), owner)
  activate(lane, owner)
  return lane
end
-- The job's status moved from `from` to `to` (or, `to` 'requeued', back to the queue): it frees
-- its slot of the window once it starts, and its key's slot under the cap once it ends.
local function fair_moved(job, job_id, from, to)
  local lane = json_field(job, 'lane')
  if not lane or from == to then return nil end
  local owner = job_owner(job)
  redis.call('ZREM', fair_key(lane, 'ahead'), job_id)
  if to ~= 'running' then
    local queue, inflight = fair_key(lane, 'q:' .. owner), fair_key(lane, 'inflight:' .. owner)
    redis.call('ZREM', queue, job_id)
    if redis.call('SREM', inflight, job_id) == 1 then
      activate(lane, owner)
    end
    if redis.call('ZCARD', queue) == 0 and redis.call('SCARD', inflight) == 0 then
      redis.call('SREM', fair_key(lane, 'keys'), owner)
    end
  end
  return lane
end
