"""Who is calling: `Authorization: Bearer <key>` -> the tenant the key belongs to.

Keys come from two places. Static keys are `tenant:key` pairs in OPTSERVE_API_KEYS, hashed once
at startup and checked in memory. Stored keys are made by `optserve keys create` (keys_cli.py) and
look like `osk_<id>_<secret>`: 12 hex digits of public id (for listing and revoking) and 32 random
bytes; the store keeps only the record {tenant, created, SHA-256 of the key} under the id.

Why a plain SHA-256 and not a password hash (bcrypt, argon2): a stored key holds 256 random bits,
so nobody can guess it from its hash by trying candidates, however fast the hash; slow hashes only
help low-entropy secrets such as passwords, and they would cost milliseconds per request. Static
keys are chosen by the operator, so they must be at least 16 characters. Hashes are compared with
hmac.compare_digest, in time independent of where they differ.

Stored records are cached per process for OPTSERVE_API_KEY_CACHE_S (1 s): a revoked key stops
working on every replica within that time, and a valid key costs one Redis read per second per
process, not one per request. Static keys never cost a round trip.

When is a key needed? Whenever OPTSERVE_API_KEYS is set or the store holds any key (checked with
the same cache, so a first `keys create` locks an open server within a second), and always when the
server listens on anything but loopback. With no key anywhere, a loopback server runs open: every
request is tenant `default`, and it says so at startup. Once a process has needed keys it keeps
needing them: revoking every key leaves it refusing everyone, not open. A server on another
address with no key refuses to start. /healthz, /readyz, /metrics, /docs and /openapi.json
never need a key.
"""

from __future__ import annotations

import hmac
import logging
import time
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from .api.problems import Problem
from .api_key import check_tenant_name, hash_key, key_id_of
from .config import Settings
from .store.api_keys import ApiKeyStore, KeyRecord
from .store.errors import StartupRefused, StoreUnavailable
from .store.rate_limit import RateLimiter
from .store.tenants import DEFAULT_TENANT

log = logging.getLogger("optserve.auth")

MIN_STATIC_KEY_LENGTH = 16
_CACHE_ENTRIES = 10_000
REALM = 'Bearer realm="optserve"'
HOW_TO_ADD_A_KEY = (
    "set OPTSERVE_API_KEYS=tenant:key,... (keys of at least 16 characters), or create one in the "
    "store with `optserve keys create --tenant NAME`"
)


@dataclass(frozen=True, slots=True)
class Tenant:
    """The caller: a tenant name, and the id of the key it used (None when the server is open)."""

    name: str
    key_id: str | None = None


def parse_static_keys(text: str) -> list[tuple[str, Tenant]]:
    """OPTSERVE_API_KEYS "team-a:k1,team-b:k2" -> [(sha256 of k1, Tenant(team-a)), ...]."""
    entries: list[tuple[str, Tenant]] = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        tenant, sep, key = item.partition(":")
        if not sep:
            raise ValueError("OPTSERVE_API_KEYS is tenant:key pairs separated by commas")
        check_tenant_name(tenant)
        if len(key) < MIN_STATIC_KEY_LENGTH:
            raise ValueError(
                f"OPTSERVE_API_KEYS: the key of tenant {tenant!r} is shorter than "
                f"{MIN_STATIC_KEY_LENGTH} characters"
            )
        digest = hash_key(key)
        entries.append((digest, Tenant(tenant, f"static-{digest[:12]}")))
    return entries


class Authenticator:
    """Turns a bearer key into a Tenant (or a 401 / 429 problem)."""

    def __init__(
        self,
        store: ApiKeyStore,
        *,
        static: list[tuple[str, Tenant]],
        open_allowed: bool,
        cache_s: float = 1.0,
        limiter: RateLimiter | None = None,
    ) -> None:
        self.store = store
        self.static = static
        self.open_allowed = open_allowed
        self.cache_s = cache_s
        self.limiter = limiter
        self._records: dict[str, tuple[float, KeyRecord | None]] = {}
        self._stored_any: tuple[float, bool] = (-1.0, False)
        self._locked = False

    @classmethod
    def from_settings(cls, settings: Settings, client) -> Authenticator:
        secret = settings.api_keys.get_secret_value() if settings.api_keys else ""
        static = parse_static_keys(secret)
        limiter = None
        if settings.rate_limit_per_s:
            burst = settings.rate_limit_burst or max(1, round(settings.rate_limit_per_s))
            limiter = RateLimiter(client, settings.rate_limit_per_s, burst)
        return cls(
            ApiKeyStore(client),
            static=static,
            open_allowed=settings.is_loopback,
            cache_s=settings.api_key_cache_s,
            limiter=limiter,
        )

    async def check_startup(self, host: str) -> None:
        """Log how callers are authenticated; StartupRefused if open on a non-loopback address.

        A store that does not answer yet does not stop the start (/readyz reports it): keys are
        then looked up once it answers, and off loopback they are required whatever it holds.
        """
        try:
            stored: int | None = await self.store.count()
        except StoreUnavailable as error:
            stored = None
            log.warning("cannot count the stored API keys yet (%s)", error)
        if self.static or stored:
            log.info(
                "API keys required (%d static in OPTSERVE_API_KEYS, %d in the store)%s",
                len(self.static), stored or 0,
                "; rate limited per key" if self.limiter else "",
            )  # fmt: skip
        elif self.open_allowed:
            log.warning(
                "no API keys: serving OPEN on loopback %s, every request is tenant %r; to require "
                "keys, %s",
                host, DEFAULT_TENANT, HOW_TO_ADD_A_KEY,
            )  # fmt: skip
        elif stored is None:
            log.warning("API keys required on %s: those in the store, once it answers", host)
        else:
            raise StartupRefused(
                f"refusing to serve on {host} without API keys (anyone who can reach it could "
                f"read and change every session): {HOW_TO_ADD_A_KEY}; or bind 127.0.0.1"
            )

    async def enforced(self) -> bool:
        if self.static or not self.open_allowed:
            return True
        if self._locked:
            return True
        expires, any_stored = self._stored_any
        if time.monotonic() >= expires:
            any_stored = await self.store.count() > 0
            self._stored_any = (time.monotonic() + self.cache_s, any_stored)
        self._locked = any_stored  # once keys are needed, revoking them all does not reopen
        return any_stored

    async def tenant(self, key: str | None) -> Tenant:
        """The caller's tenant; Problem 401 `unauthorized` or 429 `rate_limited` otherwise."""
        if not await self.enforced():
            return Tenant(DEFAULT_TENANT)
        if not key:
            raise Problem(
                "unauthorized",
                "this server needs an API key: send Authorization: Bearer <key>",
                {"WWW-Authenticate": REALM},
            )
        found = await self._lookup(key)
        if found is None:
            raise Problem(
                "unauthorized",
                "the API key is not valid (unknown, revoked or mistyped)",
                {"WWW-Authenticate": f'{REALM}, error="invalid_token"'},
            )
        if self.limiter is not None and found.key_id is not None:
            retry_after = await self.limiter.acquire(found.key_id)
            if retry_after is not None:
                raise Problem(
                    "rate_limited",
                    f"this key's request rate is over its limit; retry in {retry_after} s",
                    {"Retry-After": str(retry_after)},
                    retry_after_s=retry_after,
                )
        return found

    async def _lookup(self, key: str) -> Tenant | None:
        digest = hash_key(key)
        match: Tenant | None = None
        for static_digest, tenant in self.static:  # every entry compared: no early exit
            if hmac.compare_digest(static_digest, digest):
                match = tenant
        if match is not None:
            return match
        key_id = key_id_of(key)
        if key_id is None:
            return None
        record = await self._record(key_id)
        if record is None or not hmac.compare_digest(record.sha256, digest):
            return None
        return Tenant(record.tenant, key_id)

    async def _record(self, key_id: str) -> KeyRecord | None:
        """The stored record of a key id, read at most once per cache_s (misses cached too, so
        a flood of made-up keys costs one read per id per second)."""
        now = time.monotonic()
        cached = self._records.get(key_id)
        if cached is not None and now < cached[0]:
            return cached[1]
        record = await self.store.get(key_id)
        if len(self._records) >= _CACHE_ENTRIES:
            self._records.clear()
        self._records[key_id] = (now + self.cache_s, record)
        return record


_bearer = HTTPBearer(
    auto_error=False,
    scheme_name="apiKey",
    description="An API key: `optserve keys create --tenant NAME`, or OPTSERVE_API_KEYS.",
)


async def current_tenant(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Tenant:
    """The FastAPI dependency: the tenant of the request's bearer key."""
    authenticator: Authenticator = request.app.state.auth
    return await authenticator.tenant(credentials.credentials if credentials else None)


CurrentTenant = Annotated[Tenant, Depends(current_tenant)]
