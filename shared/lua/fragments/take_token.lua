-- take_token(bucket, capacity, rate): spends a token of a bucket refilled continuously at `rate`
-- tokens per second up to `capacity`. Returns allowed (1 or 0) and the tokens left.
local function take_token(bucket, capacity, rate)
  local now_parts = redis.call('TIME')
  local now = tonumber(now_parts[1]) + tonumber(now_parts[2]) / 1e6
  local tokens = tonumber(redis.call('HGET', bucket, 'tokens') or capacity)
  local last = tonumber(redis.call('HGET', bucket, 'at') or now)
  tokens = math.min(capacity, tokens + math.max(0, now - last) * rate)
  local allowed = 0
  if tokens >= 1 then
    tokens = tokens - 1
    allowed = 1
  end
  redis.call('HSET', bucket, 'tokens', tostring(tokens), 'at', tostring(now))
  redis.call('EXPIRE', bucket, math.ceil(capacity / rate) + 1)
  return allowed, tokens
end
