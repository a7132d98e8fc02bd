-- Renew (ARGV[2] = TTL in ms) or release (ARGV[2] = '') the lease, only if it is still ours.
-- KEYS[1] owner key; ARGV[1] our "token id " prefix of the holder value. Returns 1 or 0.
local current = redis.call('GET', KEYS[1])
if not current or string.sub(current, 1, #ARGV[1]) ~= ARGV[1] then return 0 end
if ARGV[2] == '' then redis.call('DEL', KEYS[1]) else redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 1
