-- peek_tokens(bucket, capacity, rate): beside take_token, the tokens a bucket holds now,
-- spending none and writing nothing.
local function peek_tokens(bucket, capacity, rate)
  local now_parts = redis.call('TIME')
  local now = tonumber(now_parts[1]) + tonumber(now_parts[2]) / 1e6
  local tokens = tonumber(redis.call('HGET', bucket, 'tokens') or capacity)
  local last = tonumber(redis.call('HGET', bucket, 'at') or now)
  return math.min(capacity, tokens + math.max(0, now - last) * rate)
end
