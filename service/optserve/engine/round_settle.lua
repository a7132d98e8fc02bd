-- The applier of a round records its outcome and wakes the round's waiters on every replica.
-- The result arrays (if any) were written beforehand with plain SETs.
-- KEYS[1] round hash   KEYS[2] round lease
-- ARGV[1] the applier's token   ARGV[2] 'done' or 'failed'   ARGV[3] settled round TTL ms
-- ARGV[4] rounds channel   ARGV[5] round number   the rest: field/value pairs of the outcome
-- Returns {'ok'}, or {state} when the caller no longer owns the round (its lease lapsed and a
-- waiter failed the round): then nothing is written.
local state = redis.call('HGET', KEYS[1], 'state')
if state ~= 'applying' or redis.call('HGET', KEYS[1], 'owner') ~= ARGV[1] then
  return {state or 'gone'}
end
redis.call('HSET', KEYS[1], 'state', ARGV[2])
for i = 6, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
redis.call('PEXPIRE', KEYS[1], ARGV[3])
redis.call('DEL', KEYS[2])
redis.call('PUBLISH', ARGV[4], ARGV[5])
return {'ok'}
