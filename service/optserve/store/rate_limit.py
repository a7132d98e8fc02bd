"""Rate limiting per API key, shared by every replica: GCRA in one small Lua script.

GCRA (the generic cell rate algorithm) keeps one number per key, the "theoretical arrival time"
(TAT) of the next request: each allowed request pushes it `interval` (1/rate) further, and a
request is refused while the TAT is more than `burst` intervals ahead of now. That is a token
bucket of `burst` tokens refilled at `rate` per second, kept in one Redis string with a TTL, read
and written atomically by one script, timed by the Redis server's clock (so replicas' clocks
never matter). A refusal says exactly when the request would be allowed: the Retry-After.
"""

from __future__ import annotations

import math

import redis.asyncio as aioredis

from . import keys
from .redis_store import _guard

# KEYS[1] the key's TAT (ms, as text). ARGV[1] interval in ms, ARGV[2] burst.
# Returns "0" if allowed (and records it), else the ms to wait before it would be.
_GCRA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local new_tat = tat + interval
local allow_at = new_tat - burst * interval
if now < allow_at then return string.format('%.3f', allow_at - now) end
redis.call('SET', KEYS[1], string.format('%.3f', new_tat), 'PX', math.ceil(new_tat - now) + 1)
return '0'
"""


class RateLimiter:
    """`rate` requests per second per key, up to `burst` at once."""

    def __init__(self, client: aioredis.Redis, rate: float, burst: int) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError(f"rate must be > 0 and burst >= 1, not {rate}, {burst}")
        self.interval_ms = 1000.0 / rate
        self.burst = burst
        self._script = client.register_script(_GCRA)

    async def acquire(self, key_id: str) -> int | None:
        """None if the request may go ahead (and it is counted); else its Retry-After in whole
        seconds, at least 1, after which it would be allowed."""
        key = keys.rate_limit_key(key_id)
        wait_ms = float(
            await _guard(lambda: self._script(keys=[key], args=[self.interval_ms, self.burst]))
        )
        if wait_ms <= 0:
            return None
        return max(1, math.ceil(wait_ms / 1000))
