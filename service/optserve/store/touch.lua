-- Renew a session's expiry on use (see store/redis_store.py): every key gets the meta's TTL.
-- KEYS[1]        the session's meta hash
-- KEYS[2 ..]     every array key of the session, from the manifests at ARGV[1]
-- ARGV[1]        the version those manifests belong to
-- Returns 1 if renewed, 0 if the session is gone, has no TTL, or moved on (its key list may be
-- stale: renewing only some keys would let the others expire first).
local version = redis.call('HGET', KEYS[1], 'version')
if not version or tonumber(version) ~= tonumber(ARGV[1]) then return 0 end
local ttl = redis.call('HGET', KEYS[1], 'ttl_ms')
if not ttl then return 0 end
for i = 1, #KEYS do redis.call('PEXPIRE', KEYS[i], ttl) end
return 1
