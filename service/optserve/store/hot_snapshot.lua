-- Write a hot session's snapshot and trim the log behind it, fenced (see store/hot_log.py).
-- KEYS[1] owner key, KEYS[2] meta hash, KEYS[3] log stream
-- KEYS[4 .. 3+2p]      p pairs: staged array chunk, live array key
-- next d keys          keys to delete: array chunks no longer used, gradients the snapshot covers
-- ARGV[1] the owner's "token id " prefix; ARGV[2] p; ARGV[3] d; ARGV[4] the snapshot field's
-- JSON; ARGV[5] events channel; ARGV[6] new version ('' if unchanged); ARGV[7] x log entry ids;
-- ARGV[8] the lowest stored version this snapshot may be written at (with a new version: the
-- version it must be at); a store that lost writes is below it
-- ARGV[9] the session's TTL: '' keeps it, 'none' removes it, else the new TTL in ms
-- the keys after the deletes: every key of the session to renew with its TTL
-- next x values        log entry ids the snapshot covers (deleted from the stream)
-- the rest             meta field/value pairs to set (manifests; config and schedule on import)
-- Returns {0}; {-4} if fenced off; {-1} if the session is gone; {-2, stored version} if the
-- store is behind the snapshot. Nothing is written otherwise.
local p, d, x = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[7])
local function drop_staged()
  for i = 1, p do redis.call('DEL', KEYS[2 + 2 * i]) end
end
local current = redis.call('HGET', KEYS[2], 'version')
if not current then
  drop_staged()
  return {-1}
end
local owner = redis.call('GET', KEYS[1])
if not owner or string.sub(owner, 1, #ARGV[1]) ~= ARGV[1] then
  drop_staged()
  return {-4}
end
if tonumber(current) < tonumber(ARGV[8]) or (ARGV[6] ~= '' and tonumber(current) ~= tonumber(ARGV[8])) then
  drop_staged()
  return {-2, tonumber(current)}
end
for i = 1, p do
  redis.call('RENAME', KEYS[2 + 2 * i], KEYS[3 + 2 * i])
  redis.call('PERSIST', KEYS[3 + 2 * i])
end
for i = 4 + 2 * p, 3 + 2 * p + d do redis.call('DEL', KEYS[i]) end
for i = 10, 9 + x do redis.call('XDEL', KEYS[3], ARGV[i]) end
redis.call('HSET', KEYS[2], 'snap', ARGV[4])
for i = 10 + x, #ARGV, 2 do redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1]) end
local first_renew = 4 + 2 * p + d
local mode = ARGV[9]
if mode == 'none' then
  redis.call('HDEL', KEYS[2], 'ttl_ms')
  redis.call('PERSIST', KEYS[2])
  redis.call('PERSIST', KEYS[3])
  for i = first_renew, #KEYS do redis.call('PERSIST', KEYS[i]) end
else
  if mode ~= '' then redis.call('HSET', KEYS[2], 'ttl_ms', mode) end
  local ttl = redis.call('HGET', KEYS[2], 'ttl_ms')
  if ttl then
    redis.call('PEXPIRE', KEYS[2], ttl)
    redis.call('PEXPIRE', KEYS[3], ttl)
    for i = first_renew, #KEYS do redis.call('PEXPIRE', KEYS[i], ttl) end
  end
end
if ARGV[6] ~= '' then
  redis.call('HSET', KEYS[2], 'version', ARGV[6])
  redis.call('PUBLISH', ARGV[5], ARGV[6])
end
return {0}
