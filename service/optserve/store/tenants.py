"""Which sessions belong to which tenant: one sorted set per tenant, plus the owner in the meta.

The per-tenant index is a key of its own, outside every session's hash tag, so it is never written
in the same MULTI or Lua call as a session's keys (that would cross Redis Cluster slots). The
order makes a crash harmless: creating, the session is admitted to the index first and written
second; deleting, it is removed first and dropped from the index second. Either way a crash leaves
at most an index entry without a session, which nobody can see (listings skip ids whose meta is
gone and drop them). The same goes for a session that expired (ttl_s): its entry stays until a
listing, the sweeper (store/sweeper.py) or a create that finds the tenant at its bound (`prune`)
notices the meta is gone, so such entries never keep a tenant from creating sessions.
"""

from __future__ import annotations

import time

import redis.asyncio as aioredis

from . import keys
from .redis_store import _guard

#: Field of a session's meta hash naming the tenant that owns it.
TENANT_FIELD = "tenant"
#: The tenant of every request when the server runs open, and of sessions older than tenants.
DEFAULT_TENANT = "default"

# KEYS[1] the tenant's index; ARGV: session id, score, bound. 1 if admitted, 0 if full.
_ADMIT = """
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[3]) then return 0 end
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
return 1
"""


class TenantIndex:
    """A tenant's sessions: admit under a bound, list, drop; and who owns a session."""

    def __init__(self, client: aioredis.Redis) -> None:
        self.client = client
        self._admit = client.register_script(_ADMIT)

    async def admit(self, tenant: str, sid: str, bound: int) -> bool:
        """Add `sid` to the tenant's index unless it already holds `bound` sessions (atomic)."""
        key = keys.tenant_sessions_key(tenant)
        return bool(await _guard(lambda: self._admit(keys=[key], args=[sid, time.time(), bound])))

    async def drop(self, tenant: str, sid: str) -> None:
        await _guard(lambda: self.client.zrem(keys.tenant_sessions_key(tenant), sid))

    async def prune(self, tenant: str) -> int:
        """Drop the tenant's entries whose session is gone; how many were dropped."""
        return await self._prune(keys.tenant_sessions_key(tenant))

    async def sweep(self) -> int:
        """Prune every tenant's index (the sweeper's pass); how many entries were dropped."""
        dropped = 0
        async for key in self.client.scan_iter(match=keys.TENANT_SESSIONS_PATTERN, count=1000):
            dropped += await self._prune(key)
        return dropped

    async def _prune(self, key: str | bytes) -> int:
        # One tenant's index holds at most OPTSERVE_MAX_SESSIONS_PER_TENANT ids (plus leftovers).
        sids = [value.decode() for value in await _guard(lambda: self.client.zrange(key, 0, -1))]
        gone = await _gone(self.client, sids)
        if gone:
            await _guard(lambda: self.client.zrem(key, *gone))
        return len(gone)

    async def ids(self, tenant: str, offset: int, limit: int) -> list[str]:
        """The tenant's session ids, oldest first."""
        key = keys.tenant_sessions_key(tenant)
        raw = await _guard(lambda: self.client.zrange(key, offset, offset + limit - 1))
        return [value.decode() for value in raw]

    async def owner(self, sid: str) -> str | None:
        """The tenant in the session's meta; None if there is no such session. Sessions made
        before tenants existed have none and belong to `default`."""

        async def run() -> list:
            async with self.client.pipeline(transaction=False) as pipe:
                pipe.exists(keys.meta_key(sid))
                pipe.hget(keys.meta_key(sid), TENANT_FIELD)
                return await pipe.execute()

        exists, tenant = await _guard(run)
        if not exists:
            return None
        return tenant.decode() if tenant is not None else DEFAULT_TENANT


# KEYS[1] a session's meta. Sets its tenant only if the meta exists (never a meta of one field).
_ADOPT = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
return redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2])
"""


_ADOPT_ARGS = (TENANT_FIELD, DEFAULT_TENANT)


async def adopt_untenanted(client: aioredis.Redis) -> int:
    """Give sessions made before tenants existed (no tenant in their meta) to `default`: the
    field in their meta and an entry in its index, so its listing shows them. Idempotent; one
    pipelined read per 1000 sessions of the global index. Returns how many it adopted."""
    adopt = client.register_script(_ADOPT)
    adopted = 0
    cursor = 0
    while True:
        cursor, entries = await _guard(
            lambda c=cursor: client.zscan(keys.SESSION_INDEX, c, count=1000)
        )
        scored = {member.decode(): score for member, score in entries}
        tenants = await _read_tenants(client, list(scored))
        orphans = {sid: scored[sid] for sid, tenant in tenants.items() if tenant is None}
        if orphans:
            index = keys.tenant_sessions_key(DEFAULT_TENANT)
            await _guard(lambda o=orphans, i=index: client.zadd(i, o))
            for sid in orphans:  # one round trip each, but only once per old session
                await _guard(lambda s=sid: adopt(keys=[keys.meta_key(s)], args=_ADOPT_ARGS))
            adopted += len(orphans)
        if cursor == 0:
            return adopted


async def _read_tenants(client: aioredis.Redis, sids: list[str]) -> dict[str, str | None]:
    """sid -> the tenant in its meta (None if it has none); sessions that are gone left out."""

    async def run() -> list:
        async with client.pipeline(transaction=False) as pipe:
            for sid in sids:
                pipe.hmget(keys.meta_key(sid), [keys.VERSION_FIELD, TENANT_FIELD])
            return await pipe.execute()

    replies = await _guard(run) if sids else []
    return {
        sid: tenant.decode() if tenant is not None else None
        for sid, (version, tenant) in zip(sids, replies, strict=True)
        if version is not None
    }


async def _gone(client: aioredis.Redis, sids: list[str]) -> list[str]:
    """The ids among `sids` whose meta no longer exists."""
    if not sids:
        return []

    async def run() -> list:
        async with client.pipeline(transaction=False) as pipe:
            for sid in sids:
                pipe.exists(keys.meta_key(sid))
            return await pipe.execute()

    return [sid for sid, alive in zip(sids, await _guard(run), strict=True) if not alive]
