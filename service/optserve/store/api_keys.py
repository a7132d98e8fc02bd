"""Stored API keys: one Redis hash, public key id -> {tenant, created, sha256 of the key}.

The key itself is never stored: only its SHA-256. The store moves records; hashing, parsing and
comparing keys is auth.py's job. Every call here touches the one hash key, so it works the same
on a Redis Cluster.
"""

from __future__ import annotations

from dataclasses import dataclass

import orjson
import redis
import redis.asyncio as aioredis

from . import keys
from .redis_store import _guard


@dataclass(frozen=True, slots=True)
class KeyRecord:
    """What is kept of one API key: who it belongs to and a hash of it, never the key."""

    key_id: str
    tenant: str
    created: str
    sha256: str

    def to_json(self) -> bytes:
        return orjson.dumps({"tenant": self.tenant, "created": self.created, "sha256": self.sha256})

    @classmethod
    def from_json(cls, key_id: str, raw: bytes | str) -> KeyRecord:
        data = orjson.loads(raw)
        return cls(key_id, data["tenant"], data["created"], data["sha256"])


class ApiKeyStore:
    """The server's (async) view: read one record, or whether any key exists."""

    def __init__(self, client: aioredis.Redis) -> None:
        self.client = client

    async def get(self, key_id: str) -> KeyRecord | None:
        raw = await _guard(lambda: self.client.hget(keys.API_KEYS, key_id))
        return None if raw is None else KeyRecord.from_json(key_id, raw)

    async def count(self) -> int:
        return int(await _guard(lambda: self.client.hlen(keys.API_KEYS)))


class ApiKeyAdmin:
    """The admin CLI's (sync) view: create, list and revoke records."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client

    def add(self, record: KeyRecord) -> bool:
        """Store a new record; False if its id is taken (the caller draws another)."""
        return bool(self.client.hsetnx(keys.API_KEYS, record.key_id, record.to_json()))

    def all(self) -> list[KeyRecord]:
        raw = self.client.hgetall(keys.API_KEYS)
        records = [KeyRecord.from_json(k.decode(), v) for k, v in raw.items()]
        return sorted(records, key=lambda r: (r.created, r.key_id))

    def revoke(self, key_id: str) -> bool:
        """Delete a record; False if there was none."""
        return bool(self.client.hdel(keys.API_KEYS, key_id))
