-- A pusher of a done round got its result: once every pusher the round applied has, the
-- result arrays go at once instead of waiting out their TTL (big models, fast rounds).
-- KEYS[1] round hash   KEYS[2 ..] the round's result arrays
-- Returns how many pushers have acknowledged (0 if the round expired).
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local acks = redis.call('HINCRBY', KEYS[1], 'acks', 1)
if acks >= tonumber(redis.call('HGET', KEYS[1], 'applied') or '0') then
  for i = 2, #KEYS do redis.call('UNLINK', KEYS[i]) end
end
return acks
