-- Register one push into a session's open sync round (see engine/rounds.py).
-- The push's gradient arrays were written beforehand with plain SETs; only names pass here.
-- KEYS[1] round pointer   KEYS[2] round hash   KEYS[3] round workers hash   KEYS[4] round lease
-- ARGV[1] round number the caller believes is open   ARGV[2] worker field   ARGV[3] push manifest
-- ARGV[4] workers (N)   ARGV[5] min_workers   ARGV[6] timeout ms   ARGV[7] open round TTL ms
-- ARGV[8] lease ms   ARGV[9] pointer TTL ms   ARGV[10] this push's token (owner if it applies)
-- Returns {'moved', open round} (call again with that number), {'duplicate', n},
-- {'apply', n, count, 0} (this push completed the round: the caller applies it) or
-- {'wait', n, count, ms until the round's deadline}.
local n = tonumber(ARGV[1])
local current = tonumber(redis.call('GET', KEYS[1]) or '1')
if current ~= n then return {'moved', current} end
local state = redis.call('HGET', KEYS[2], 'state')
if state and state ~= 'open' then
  -- Cannot happen while closing advances the pointer in the same script; heal it anyway.
  redis.call('SET', KEYS[1], n + 1, 'PX', ARGV[9])
  return {'moved', n + 1}
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if not state then
  redis.call('DEL', KEYS[3])
  redis.call('HSET', KEYS[2], 'state', 'open', 'count', 0, 'need', ARGV[4], 'min', ARGV[5],
    'opened', now, 'deadline', now + tonumber(ARGV[6]))
  redis.call('PEXPIRE', KEYS[2], ARGV[7])
end
if redis.call('HSETNX', KEYS[3], ARGV[2], ARGV[3]) == 0 then return {'duplicate', n} end
redis.call('PEXPIRE', KEYS[3], ARGV[7])
local count = redis.call('HINCRBY', KEYS[2], 'count', 1)
if count >= tonumber(redis.call('HGET', KEYS[2], 'need')) then
  redis.call('HSET', KEYS[2], 'state', 'applying', 'owner', ARGV[10], 'applied', count)
  redis.call('SET', KEYS[4], ARGV[10], 'PX', ARGV[8])
  redis.call('SET', KEYS[1], n + 1, 'PX', ARGV[9])
  return {'apply', n, count, 0}
end
redis.call('SET', KEYS[1], n, 'PX', ARGV[9])
return {'wait', n, count, tonumber(redis.call('HGET', KEYS[2], 'deadline')) - now}
