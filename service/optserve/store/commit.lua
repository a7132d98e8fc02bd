-- Compare-and-set commit of one session (see store/redis_store.py).
-- KEYS[1]                 the session's meta hash
-- KEYS[2 .. 1+2p]         p pairs: staged array key, live array key
-- next d keys             live array keys to delete
-- next r keys             idempotency records to create (must not exist yet)
-- the remaining keys      every live array key of the session after the commit (only when the
--                         session has or gets a TTL): they share the meta's expiry
-- ARGV[1]                 expected version, or "" for an unconditional commit
-- ARGV[2], ARGV[3], ARGV[4]   p, d, r
-- ARGV[5]                 how much to add to the version (0 keeps it)
-- ARGV[6]                 idempotency record TTL in milliseconds
-- ARGV[7]                 the channel that hears the new version
-- ARGV[8]                 the session TTL (ms) the caller read in meta, "" for none: a TTL
--                         changed since then is a conflict (the caller's key list may be stale)
-- ARGV[9]                 the TTL (ms) the session has after the commit, "" for none
-- next r values           the idempotency records' values
-- the rest                meta field/value pairs to set
-- Returns the new version; -1 if the session is gone; {-2, current} on a version conflict;
-- {-3, current} if an idempotency record already exists. Nothing is written unless it succeeds.
local p, d, r = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local first_idem = 2 + 2 * p + d
local first_live = first_idem + r
local current = redis.call('HGET', KEYS[1], 'version')
local ttl = redis.call('HGET', KEYS[1], 'ttl_ms') or ''
local function drop_staged()
  for i = 1, p do redis.call('DEL', KEYS[2 * i]) end
end
if not current then
  drop_staged()
  return -1
end
if ARGV[1] ~= '' and tonumber(current) ~= tonumber(ARGV[1]) then
  drop_staged()
  return {-2, tonumber(current)}
end
if ttl ~= ARGV[8] then
  drop_staged()
  return {-2, tonumber(current)}
end
for i = 0, r - 1 do
  if redis.call('EXISTS', KEYS[first_idem + i]) == 1 then
    drop_staged()
    return {-3, tonumber(current)}
  end
end
for i = 1, p do
  redis.call('RENAME', KEYS[2 * i], KEYS[2 * i + 1])
  redis.call('PERSIST', KEYS[2 * i + 1])
end
for i = 2 + 2 * p, first_idem - 1 do redis.call('DEL', KEYS[i]) end
for i = 0, r - 1 do
  redis.call('SET', KEYS[first_idem + i], ARGV[10 + i], 'PX', ARGV[6])
end
-- Every key of the session expires at the same moment, or none does: a partial session never
-- outlives its meta. (Idempotency records keep their own TTL: a retry must never apply twice
-- while the session lives; the sweeper removes them once it is gone.)
local new_ttl = ARGV[9]
if new_ttl ~= '' then
  redis.call('HSET', KEYS[1], 'ttl_ms', new_ttl)
  redis.call('PEXPIRE', KEYS[1], new_ttl)
  for i = first_live, #KEYS do redis.call('PEXPIRE', KEYS[i], new_ttl) end
elseif ttl ~= '' then
  redis.call('HDEL', KEYS[1], 'ttl_ms')
  redis.call('PERSIST', KEYS[1])
  for i = first_live, #KEYS do redis.call('PERSIST', KEYS[i]) end
end
local version = tonumber(current) + tonumber(ARGV[5])
redis.call('HSET', KEYS[1], 'version', version)
for i = 10 + r, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
if tonumber(ARGV[5]) > 0 then redis.call('PUBLISH', ARGV[7], version) end
return version
