-- What a submission may do before its input images are fetched: replay an earlier job with the
-- same idempotency key (spending nothing), or spend a token of the owner's bucket.
--
-- KEYS[1]: the idempotency key, t2i:idem:<owner>:<key>
-- KEYS[2]: the owner's rate-limit bucket, t2i:ratelimit:<key id>
-- ARGV[1]: '1' when the request has an idempotency key
-- ARGV[2], ARGV[3]: the bucket's capacity (0: no limit) and tokens per second
-- Other keys: none.
-- Returns: {0, existing idempotency value, tokens} for a replay; {1, '', tokens} spent a token;
--   {-2, '', tokens} the bucket is empty (tokens: left in the bucket, '' with no limit).
--#include take_token
--#include peek_tokens
local capacity = tonumber(ARGV[2])
if ARGV[1] == '1' then
  local existing = redis.call('GET', KEYS[1])
  if existing then
    local tokens = ''
    if capacity > 0 then tokens = tostring(peek_tokens(KEYS[2], capacity, tonumber(ARGV[3]))) end
    return {0, existing, tokens}
  end
end
if capacity == 0 then return {1, '', ''} end
local allowed, left = take_token(KEYS[2], capacity, tonumber(ARGV[3]))
if allowed == 0 then return {-2, '', tostring(left)} end
return {1, '', tostring(left)}
