-- Compare-and-set commit of one session (see store/redis_store.py).
-- KEYS[1]            the session's meta hash
-- KEYS[2..1+2n]      pairs: staged array key, live array key
-- KEYS[2+2n..]       live array keys to delete
-- ARGV[1]            expected version, or "" for an unconditional commit
-- ARGV[2]            n, the number of staged pairs
-- ARGV[3]            1 to increment the version, 0 to keep it
-- ARGV[4..]          meta field/value pairs to set
-- Returns the new version, -1 if the session is gone, or {-2, current} on a version conflict.
local n = tonumber(ARGV[2])
local current = redis.call('HGET', KEYS[1], 'version')
local function drop_staged()
  for i = 1, n do redis.call('DEL', KEYS[2 * i]) end
end
if not current then
  drop_staged()
  return -1
end
if ARGV[1] ~= '' and tonumber(current) ~= tonumber(ARGV[1]) then
  drop_staged()
  return {-2, tonumber(current)}
end
for i = 1, n do
  redis.call('RENAME', KEYS[2 * i], KEYS[2 * i + 1])
  redis.call('PERSIST', KEYS[2 * i + 1])
end
for i = 2 + 2 * n, #KEYS do redis.call('DEL', KEYS[i]) end
local version = tonumber(current)
if ARGV[3] == '1' then version = version + 1 end
redis.call('HSET', KEYS[1], 'version', version)
for i = 4, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
return version
