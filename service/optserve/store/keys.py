"""Every Redis key name optserve uses, in one place.

All keys of a session share the hash tag `{<sid>}`, so a session lives on one Redis Cluster slot
and the commit script's multi-key operations stay atomic there. Arrays are one key each, so a
commit writes only the arrays it changed and a pull reads only the params it needs.
"""

from __future__ import annotations

PREFIX = "optserve"

#: Sorted set of session ids (score: creation time) for listing; the only key outside a hash tag.
SESSION_INDEX = f"{PREFIX}:sessions"

#: Meta hash field naming the list of arrays stored for one tensor (`param` and state names).
MANIFEST_FIELD_PREFIX = "a:"
VERSION_FIELD = "version"
#: Meta hash field holding the session's idle TTL in milliseconds (absent: the session never
#: expires); the commit and touch scripts read it, so it lives beside the version.
TTL_FIELD = "ttl_ms"


def session_tag(sid: str) -> str:
    return f"{PREFIX}:{{{sid}}}"


#: Pattern matching every key inside any session's hash tag (the sweeper scans with it). Session
#: ids are 32 hex digits (engine/sessions.py), so other hash-tagged keys never match.
SESSION_KEYS_PATTERN = f"{PREFIX}:{{{'[0-9a-f]' * 32}}}:*"


def sid_of_key(key: bytes | str) -> str | None:
    """The session id inside a key's hash tag, or None for a key outside any session."""
    text = key.decode() if isinstance(key, bytes) else key
    start = text.find("{")
    end = text.find("}", start + 1)
    return text[start + 1 : end] if 0 <= start < end else None


def meta_key(sid: str) -> str:
    """Hash: version, config, schedule, timestamps and one manifest field per tensor."""
    return f"{session_tag(sid)}:meta"


def array_key(sid: str, tensor: str, field: str, chunk: int = 0) -> str:
    """One chunk of the raw little-endian float32 bytes of one array (`param`, a state array, or
    a 0-dim scalar); large arrays span several chunks so no Redis value grows unbounded.

    The field and chunk come before the tensor name so that any tensor name, even one with ':',
    is unambiguous.
    """
    return f"{session_tag(sid)}:a:{field}:{chunk}:{tensor}"


def staged_key(sid: str, token: str, tensor: str, field: str, chunk: int = 0) -> str:
    """Where a commit writes a chunk before the compare-and-set script renames it into place."""
    return f"{session_tag(sid)}:stage:{token}:{field}:{chunk}:{tensor}"


def idempotency_key(sid: str, digest: str) -> str:
    """The first response to a push sent with an Idempotency-Key (hashed: keys are client text)."""
    return f"{session_tag(sid)}:idem:{digest}"


def lease_key(sid: str) -> str:
    """Who may apply this session's next batch after a lost commit (fairness across replicas;
    the compare-and-set commit alone keeps it correct)."""
    return f"{session_tag(sid)}:lease"


def events_channel(sid: str) -> str:
    """Pub/sub channel that hears each new version of the session (long-poll wakes on it)."""
    return f"{session_tag(sid)}:events"


#: Pattern that matches every session's events channel (one subscription per process).
EVENTS_PATTERN = f"{PREFIX}:*:events"


def manifest_field(tensor: str) -> str:
    return f"{MANIFEST_FIELD_PREFIX}{tensor}"


# -- tenants and API keys (store/tenants.py, store/api_keys.py) ----------------------------------
# These keys sit outside any session's hash tag: each is touched alone (never in a MULTI or Lua
# call with session keys), so they work the same on Redis Cluster.

#: Hash of stored API keys: public key id -> JSON {tenant, created, sha256 of the key}.
API_KEYS = f"{PREFIX}:apikeys"


def tenant_sessions_key(tenant: str) -> str:
    """Sorted set of one tenant's session ids (score: creation time): its listing and its count."""
    return f"{PREFIX}:tenant:{tenant}:sessions"


#: Matches every tenant's session index (the sweeper prunes them).
TENANT_SESSIONS_PATTERN = f"{PREFIX}:tenant:*:sessions"


def rate_limit_key(key_id: str) -> str:
    """One API key's rate-limit state (GCRA: its theoretical arrival time in ms)."""
    return f"{PREFIX}:ratelimit:{key_id}"


# -- the hot engine (engine/hot): ownership lease, gradient log, snapshot -------------------------


def owner_key(sid: str) -> str:
    """Which process serves the session from memory: "<fencing token> <owner id> <url>", with a
    TTL the owner keeps renewing (expired = anyone may take over)."""
    return f"{session_tag(sid)}:owner"


def fence_key(sid: str) -> str:
    """Counter the fencing tokens come from (INCR): each new owner gets a larger one."""
    return f"{session_tag(sid)}:fence"


def log_key(sid: str) -> str:
    """Stream: one entry per applied push (or config change) since the snapshot, in order."""
    return f"{session_tag(sid)}:log"


def log_array_key(sid: str, version: int, tensor: str, chunk: int = 0) -> str:
    """One chunk of the float32 gradient of `tensor` in the push that made `version`."""
    return f"{session_tag(sid)}:lg:{version}:{chunk}:{tensor}"


def log_staged_key(sid: str, token: str, version: int, tensor: str, chunk: int = 0) -> str:
    """Where an append writes a gradient chunk before the fenced script renames it into place."""
    return f"{session_tag(sid)}:lgstage:{token}:{version}:{chunk}:{tensor}"


#: Meta hash field: JSON {version, log_id, config, schedule} of the arrays stored under array_key.
SNAPSHOT_FIELD = "snap"
