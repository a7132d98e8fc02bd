"""Tenants: a session belongs to the tenant that created it, and no other tenant can tell it exists.

Another tenant's session answers exactly as a missing one does (404 `session_not_found`, same
body), and listings read only the caller's own index. A session's owner never changes and its id
is never reused, so the owner is cached in the process once read: after the first request on a
session, checking it costs no Redis round trip.
"""

from __future__ import annotations

from collections import OrderedDict

from ..store.tenants import TenantIndex
from .errors import not_found
from .limits import Limits

#: Owners remembered per process (an entry is ~200 bytes: ~13 MB at most).
OWNER_CACHE_SIZE = 65_536


class Tenancy:
    """Ownership checks, the per-tenant index and its session bound."""

    def __init__(self, index: TenantIndex, limits: Limits) -> None:
        self.index = index
        self.limits = limits
        self._owners: OrderedDict[str, str] = OrderedDict()

    async def owner(self, sid: str) -> str | None:
        """The session's tenant, or None if there is no such session."""
        tenant = self._owners.get(sid)
        if tenant is not None:
            self._owners.move_to_end(sid)
            return tenant
        tenant = await self.index.owner(sid)
        if tenant is not None:
            self._remember(sid, tenant)
        return tenant

    def _remember(self, sid: str, tenant: str) -> None:
        self._owners[sid] = tenant
        if len(self._owners) > OWNER_CACHE_SIZE:
            self._owners.popitem(last=False)

    async def check(self, sid: str, tenant: str) -> None:
        """Raise 404 `session_not_found` unless `tenant` owns `sid`: the same answer whether the
        session is missing or another tenant's."""
        if await self.owner(sid) != tenant:
            raise not_found(sid)

    async def admit(self, tenant: str, sid: str) -> None:
        """Count a new session against its tenant's bound (422 `too_many_sessions` past it)."""
        bound = self.limits.max_sessions_per_tenant
        admitted = await self.index.admit(tenant, sid, bound)
        # Full: entries of sessions that expired or were half-created may still count; drop them.
        if not admitted and await self.index.prune(tenant):
            admitted = await self.index.admit(tenant, sid, bound)
        if not admitted:
            raise self.limits.too_many_sessions(tenant)
        self._remember(sid, tenant)

    async def drop(self, tenant: str, sid: str) -> None:
        await self.index.drop(tenant, sid)

    async def ids(self, tenant: str, offset: int, limit: int) -> list[str]:
        return await self.index.ids(tenant, offset, limit)
