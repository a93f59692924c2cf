-- Records a webhook delivery, once per job for a once-per-job event.
--
-- KEYS[1]: the delivery, t2i:delivery:<delivery id>
-- KEYS[2]: the job's deliveries, t2i:job:<id>:webhooks
-- KEYS[3]: for a once-per-job event, its marker (absent otherwise)
-- ARGV[1]: delivery id; ARGV[2]: retention seconds; ARGV[3...]: the delivery's fields
-- Other keys: none.
-- Returns: the id of the delivery that stands: an earlier one of a once-per-job event, or this
--   one.
if KEYS[3] then
  local earlier = redis.call('GET', KEYS[3])
  if earlier then return earlier end
  redis.call('SET', KEYS[3], ARGV[1], 'EX', ARGV[2])
end
redis.call('HSET', KEYS[1], unpack(ARGV, 3))
redis.call('EXPIRE', KEYS[1], ARGV[2])
redis.call('RPUSH', KEYS[2], ARGV[1])
redis.call('EXPIRE', KEYS[2], ARGV[2])
return ARGV[1]
