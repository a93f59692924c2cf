-- Extends or releases a round lock, only while the caller holds it.
--
-- KEYS[1]: the lock
-- ARGV[1]: the holder's token; ARGV[2]: the lock's new time to live in ms (0: delete it)
-- Other keys: none.
-- Returns: 0 when the caller no longer holds the lock, else PEXPIRE's or DEL's reply.
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if tonumber(ARGV[2]) > 0 then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return redis.call('DEL', KEYS[1])
