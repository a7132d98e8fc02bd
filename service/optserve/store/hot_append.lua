-- Append to a hot session's log, fenced by the owner's token (see store/hot_log.py).
-- KEYS[1] owner key, KEYS[2] meta hash, KEYS[3] log stream
-- KEYS[4 .. 3+2p]      p pairs: staged gradient chunk, its log key
-- next r keys          idempotency records to create (must not exist yet)
-- ARGV[1] the owner's "token id " prefix; ARGV[2] p; ARGV[3] r; ARGV[4] record TTL (ms)
-- ARGV[5] events channel; ARGV[6] the new version ('' if unchanged); ARGV[7] n entries
-- ARGV[8] the version the owner's memory is at (the session's stored version must equal it)
-- ARGV[9] the session's TTL: '' keeps it, 'none' removes it, else the new TTL in ms
-- ARGV[10] the ownership lease in ms: an append renews it (never past the session's own TTL)
-- the keys after the records: every key of the session to renew with its TTL (a use)
-- next r values        the records
-- then n entries       each: c, then c field/value pairs (one XADD each, in order)
-- the rest             meta field/value pairs to set
-- Returns {0, entry ids...}; {-4} if the lease is not ours (fenced off); {-1} if the session
-- is gone; {-2, stored version} if the store lost writes the owner had (a store restarted
-- from an older AOF): the owner must reload; {-3} if a record exists. Nothing is written
-- unless it succeeds.
local p, r, n = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[7])
local first_idem = 4 + 2 * p
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
if tonumber(current) ~= tonumber(ARGV[8]) then
  drop_staged()
  return {-2, tonumber(current)}
end
for i = 0, r - 1 do
  if redis.call('EXISTS', KEYS[first_idem + i]) == 1 then
    drop_staged()
    return {-3}
  end
end
for i = 1, p do
  redis.call('RENAME', KEYS[2 + 2 * i], KEYS[3 + 2 * i])
  redis.call('PERSIST', KEYS[3 + 2 * i])
end
for i = 0, r - 1 do
  redis.call('SET', KEYS[first_idem + i], ARGV[11 + i], 'PX', ARGV[4])
end
local a = 11 + r
local reply = {0}
for _ = 1, n do
  local c = tonumber(ARGV[a])
  local fields = {}
  for j = 1, 2 * c do fields[j] = ARGV[a + j] end
  reply[#reply + 1] = redis.call('XADD', KEYS[3], '*', unpack(fields))
  a = a + 1 + 2 * c
end
for i = a, #ARGV, 2 do redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1]) end
local first_renew = first_idem + r
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
local lease = tonumber(ARGV[10])
local left = redis.call('PTTL', KEYS[2])
if left > 0 and left < lease then lease = left end
redis.call('PEXPIRE', KEYS[1], lease)
return reply
