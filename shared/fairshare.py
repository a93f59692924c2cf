"""Fair share of the worker pool between API keys, decided as late as possible.

Queued jobs wait in Redis, in one sorted set per (lane, key), interactive before batch and then
in arrival order. A lane is the broker queue the jobs go to (one per model where models have
their own queues). The broker holds only a short window of each lane: about one batch per live
worker of messages that no worker has started yet. Whenever a slot of that window frees (a job
starts, ends, is canceled or goes back to the queue) or a job arrives, the same Lua script that
made the change moves the next job, under the fair order, into the broker as a normal Celery
task message. So a burst of one key fixes the order of at most one window's jobs.

The fair order is stride scheduling: each active key has a pass, the key with the lowest pass
sends next and its pass grows by 1 / weight; a key that becomes active starts at the pass of the
last job sent, so it neither jumps ahead with credit saved while idle nor waits behind a burst.
A key whose dispatched and running jobs reach its `max_running` leaves the active set until one
of them ends.

Each lane also keeps the set of keys with jobs waiting or in flight in it, so what an autoscaler
reads (the jobs waiting and running per lane) costs a read per such key, not a scan.

These fragments are pasted into the job store's scripts (shared/jobstore.py), which know the
job's state change they come with.
"""

import base64
import json
from functools import lru_cache

from celery import Celery

from shared.apikeys import KEY_INDEX, RECORD_PREFIX
from shared.keys import JOB_PREFIX
from shared.queue import WORKERS_KEY, render_message, worker_info_key

FAIR_PREFIX = "t2i:fair:"
LANES_KEY = FAIR_PREFIX + "lanes"
# Interactive jobs of a key go before its batch jobs; within a band, arrival order.
PRIORITY_BANDS = {"interactive": 0, "batch": 1}
BAND_SIZE = 10**13

_JOB_PLACEHOLDER = "@JOB@"
_ATTEMPT_SENTINEL = 987654321


def active_key(lane: str) -> str:
    return f"{FAIR_PREFIX}{lane}:active"


def ahead_key(lane: str) -> str:
    return f"{FAIR_PREFIX}{lane}:ahead"


def key_queue_key(lane: str, owner: str | None) -> str:
    return f"{FAIR_PREFIX}{lane}:q:{owner or '-'}"


def inflight_key(lane: str, owner: str | None) -> str:
    return f"{FAIR_PREFIX}{lane}:inflight:{owner or '-'}"


def lane_keys_key(lane: str) -> str:
    """The keys with jobs waiting or in flight in the lane."""
    return f"{FAIR_PREFIX}{lane}:keys"


@lru_cache
def _message_templates() -> tuple[str, str]:
    """(envelope, body) of a render message with placeholders: @JOB@, @ATTEMPT@, @TASK@, @TAG@,
    @QUEUE@ and, in the envelope, @BODY@ for the body in base64."""
    message = json.loads(
        render_message(
            Celery("txt2img"),
            "@QUEUE@",
            _JOB_PLACEHOLDER,
            _ATTEMPT_SENTINEL,
            task_id="@TASK@",
            delivery_tag="@TAG@",
            origin="txt2img-dispatch",
        )
    )
    body = base64.b64decode(message["body"]).decode()
    message["body"] = "@BODY@"
    sentinel = str(_ATTEMPT_SENTINEL)
    return json.dumps(message).replace(sentinel, "@ATTEMPT@"), body.replace(sentinel, "@ATTEMPT@")


# Functions every job store script may call; needs is_terminal from the event prelude.
_FAIR_LUA = """
local FAIR = 'FAIR_PREFIX'
local function fair_key(lane, part) return FAIR .. lane .. ':' .. part end
local function now_s()
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1e6
end
local function json_field(job, name)
  local raw = redis.call('HGET', job, name)
  if not raw then return nil end
  local value = cjson.decode(raw)
  if value == cjson.null then return nil end
  return value
end
local function job_owner(job) return json_field(job, 'owner') or '-' end
local function key_limits(owner)
  local f = redis.call('HMGET', 'APIKEY_PREFIX' .. owner, 'weight', 'max_running')
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
local MESSAGE = [==[MESSAGE_TEMPLATE]==]
local BODY = [==[BODY_TEMPLATE]==]
-- The broker's Redis transport takes a message as a push onto the queue's list.
local function send(lane, job_id, attempt, now)
  local n = redis.call('INCR', FAIR .. 'sent')
  local task_id = job_id .. '.' .. attempt .. '.' .. n
  local body = BODY:gsub('@JOB@', job_id):gsub('@ATTEMPT@', attempt)
  local message = MESSAGE:gsub('@BODY@', base64(body)):gsub('@JOB@', job_id)
  message = message:gsub('@ATTEMPT@', attempt):gsub('@TASK@', task_id)
  message = message:gsub('@TAG@', 'd.' .. task_id):gsub('@QUEUE@', lane)
  redis.call('LPUSH', lane, message)
  redis.call('ZADD', 'DISPATCHED_KEY', now, job_id)
  redis.call('ZADD', fair_key(lane, 'ahead'), now, job_id)
end
-- About one batch per live worker may wait in the broker or in a worker's hands, unstarted.
local function window()
  local names = redis.call('ZRANGEBYSCORE', 'WORKERS_KEY', now_s() - WORKER_MAX_AGE, '+inf')
  local slots = 0
  for _, name in ipairs(names) do
    local info = redis.call('GET', 'WORKER_INFO_PREFIX' .. name)
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
      local f = redis.call('HMGET', 'JOB_PREFIX' .. job_id, 'status', 'attempt', 'worker')
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
"""

# ARGV: job ids. Each one's position under the fair order (-1 once it is not queued): the jobs
# already in the window ahead of it, its key's jobs ahead of it, and, from every other active
# key, the jobs its pass lets go first. O(log n) per job plus O(active keys) per call.
POSITIONS_LUA = """
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
  local job = 'JOB_PREFIX' .. job_id
  local position = -1
  if redis.call('HGET', job, 'status') == 'queued' then
    local lane = json_field(job, 'lane')
    if not lane then
      position = redis.call('ZRANK', 'QUEUE_KEY', job_id) or -1
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
"""

# ARGV: lanes to report besides every lane that has had a job. Returns lane, queued, running for
# each: queued are the jobs waiting in its keys' queues or sent and not started (the window),
# running the jobs started and not ended; O(keys with jobs in the lane) per lane. Every key's jobs
# in flight are the window's plus the running ones.
BACKLOG_LUA = """
-- Keys whose jobs were queued before the lanes kept their set of keys: found once, from the index
-- of every API key.
if redis.call('SET', FAIR .. 'keys-seeded', '1', 'NX') then
  local owners = redis.call('SMEMBERS', 'APIKEY_INDEX')
  owners[#owners + 1] = '-'
  for _, lane in ipairs(redis.call('SMEMBERS', 'LANES_KEY')) do
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
for _, lane in ipairs(redis.call('SMEMBERS', 'LANES_KEY')) do
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
""".replace("APIKEY_INDEX", KEY_INDEX)


def fair_lua(worker_max_age_s: float, dispatched_key: str) -> str:
    """The fair-share functions, ready to paste into a script; `dispatched_key` is the job
    store's set of jobs sent and not yet reserved."""
    envelope, body = _message_templates()
    return (
        _FAIR_LUA.replace("FAIR_PREFIX", FAIR_PREFIX)
        .replace("APIKEY_PREFIX", RECORD_PREFIX)
        .replace("JOB_PREFIX", JOB_PREFIX)
        .replace("WORKERS_KEY", WORKERS_KEY)
        .replace("WORKER_INFO_PREFIX", worker_info_key(""))
        .replace("WORKER_MAX_AGE", repr(float(worker_max_age_s)))
        .replace("DISPATCHED_KEY", dispatched_key)
        .replace("MESSAGE_TEMPLATE", envelope)
        .replace("BODY_TEMPLATE", body)
    )
