-- Take (or keep) the hot engine's ownership lease of one session (see store/hot_log.py).
-- KEYS[1] owner key, KEYS[2] fencing counter, KEYS[3] the session's meta hash
-- ARGV[1] this process's owner id, ARGV[2] its advertised URL, ARGV[3] lease TTL (ms)
-- Returns {-1, ''} if the session is gone; {0, holder} if another process holds the lease;
-- {1, holder} if this process holds it already (renewed, same token); {2, holder} if it was free
-- and this process now holds it with a new, larger fencing token. holder = "token id url".
if redis.call('EXISTS', KEYS[3]) == 0 then return {-1, ''} end
local current = redis.call('GET', KEYS[1])
if current then
  local _, owner = string.match(current, '^(%S+) (%S+)')
  if owner == ARGV[1] then
    local ttl = tonumber(ARGV[3])
    local left = redis.call('PTTL', KEYS[3])
    if left > 0 and left < ttl then ttl = left end
    redis.call('PEXPIRE', KEYS[1], ttl)
    return {1, current}
  end
  return {0, current}
end
local token = redis.call('INCR', KEYS[2])
local holder = token .. ' ' .. ARGV[1] .. ' ' .. ARGV[2]
local ttl = tonumber(ARGV[3])
local left = redis.call('PTTL', KEYS[3])
if left > 0 and left < ttl then ttl = left end  -- a lease never outlives its session
redis.call('SET', KEYS[1], holder, 'PX', ttl)
return {2, holder}
