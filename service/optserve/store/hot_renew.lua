-- Renew (ARGV[2] = TTL in ms) or release (ARGV[2] = '') the lease, only if it is still ours.
-- KEYS[1] owner key, KEYS[2] the session's meta hash; ARGV[1] our "token id " prefix.
-- A lease never outlives its session: it is dropped with a gone session and renewed for at most
-- the session's own remaining TTL. Returns 1 if renewed (or released), else 0.
local current = redis.call('GET', KEYS[1])
if not current or string.sub(current, 1, #ARGV[1]) ~= ARGV[1] then return 0 end
if ARGV[2] == '' or redis.call('EXISTS', KEYS[2]) == 0 then
  redis.call('DEL', KEYS[1])
  return ARGV[2] == '' and 1 or 0
end
local ttl = tonumber(ARGV[2])
local left = redis.call('PTTL', KEYS[2])
if left > 0 and left < ttl then ttl = left end
redis.call('PEXPIRE', KEYS[1], ttl)
return 1
