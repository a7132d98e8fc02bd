-- What a waiter does when its round's deadline (or the applier's lease) runs out.
-- KEYS[1] round pointer   KEYS[2] round hash   KEYS[3] round lease
-- ARGV[1] round number   ARGV[2] the caller's token (owner if it applies)   ARGV[3] lease ms
-- ARGV[4] settled round TTL ms   ARGV[5] rounds channel   ARGV[6] pointer TTL ms
-- An open round past its deadline is closed: with at least min_workers pushes the caller owns
-- it and applies it ({'apply', count}); with fewer it fails ({'timeout', count}) and its
-- waiters hear of it. A round still applying answers {'applying', lease ms left}, or fails as
-- {'orphaned'} if its applier's lease lapsed (the process died). Otherwise {'early', ms left},
-- {'done'}, {'failed'} or {'gone'} (expired).
local n = tonumber(ARGV[1])
local state = redis.call('HGET', KEYS[2], 'state')
if not state then return {'gone'} end
local function fail(detail)
  redis.call('HSET', KEYS[2], 'state', 'failed', 'code', 'round_timeout', 'detail', detail)
  redis.call('PEXPIRE', KEYS[2], ARGV[4])
  redis.call('PUBLISH', ARGV[5], n)
end
if state == 'open' then
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  local deadline = tonumber(redis.call('HGET', KEYS[2], 'deadline'))
  if now < deadline then return {'early', deadline - now} end
  if tonumber(redis.call('GET', KEYS[1]) or '1') == n then
    redis.call('SET', KEYS[1], n + 1, 'PX', ARGV[6])
  end
  local count = tonumber(redis.call('HGET', KEYS[2], 'count'))
  local min = tonumber(redis.call('HGET', KEYS[2], 'min'))
  if count >= min then
    redis.call('HSET', KEYS[2], 'state', 'applying', 'owner', ARGV[2], 'applied', count)
    redis.call('SET', KEYS[3], ARGV[2], 'PX', ARGV[3])
    return {'apply', count}
  end
  fail('round ' .. n .. ' timed out with ' .. count .. ' of ' ..
    redis.call('HGET', KEYS[2], 'need') .. ' pushes; it needs at least ' .. min)
  return {'timeout', count}
end
if state == 'applying' then
  local left = redis.call('PTTL', KEYS[3])
  if left > 0 then return {'applying', left} end
  fail('the process applying round ' .. n .. ' stopped before it finished')
  return {'orphaned'}
end
return {state}
