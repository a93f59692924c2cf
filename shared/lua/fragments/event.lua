-- A job's events and its owner's per-status index, for every job store script that moves a job:
-- is_terminal(status), append_event(stream, type, data, ttl), move_status(job, id, from, to).
-- Touches the owner's indexes {{INDEX_PREFIX}}<owner> and {{INDEX_PREFIX}}<owner>:<status>.
local function is_terminal(status)
  return status == 'succeeded' or status == 'failed' or status == 'canceled' or status == 'expired'
end
local function append_event(stream, event_type, data, ttl)
  redis.call('XADD', stream, 'MAXLEN', '~', {{EVENTS_MAXLEN}}, '*', 'type', event_type, 'data', data)
  if is_terminal(event_type) then ttl = math.min(tonumber(ttl), {{FINISHED_EVENTS_TTL}}) end
  redis.call('EXPIRE', stream, ttl)
end
-- The owner's index per status follows the job; its score is the job's place in the owner's
-- index. The key is derived from the record's owner, which the caller does not know (a
-- single-node or Sentinel Redis, never Cluster, so undeclared keys are fine).
local function move_status(job, job_id, from, to)
  if from == to then return end
  local owner = redis.call('HGET', job, 'owner')
  if not owner then return end
  owner = cjson.decode(owner)
  if owner == cjson.null then owner = '-' end
  local index = '{{INDEX_PREFIX}}' .. owner
  local score = redis.call('ZSCORE', index, job_id)
  if not score then return end
  redis.call('ZREM', index .. ':' .. from, job_id)
  redis.call('ZADD', index .. ':' .. to, score, job_id)
end
