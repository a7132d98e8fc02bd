"""The API key format, apart from the server so that the admin CLI loads nothing of it.

A stored key is `osk_<id>_<secret>`: 12 hex digits of public id (listed and revoked by it) and 32
random bytes, URL-safe base64. Only its SHA-256 is kept (auth.py says why that is enough).
"""

from __future__ import annotations

import hashlib
import re
import secrets

KEY_PREFIX = "osk_"
#: Tenant names: what a Redis key, a log line and a shell argument carry without quoting.
TENANT_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_KEY_ID = re.compile(r"[0-9a-f]{12}")


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def check_tenant_name(name: str) -> str:
    if TENANT_NAME.fullmatch(name) is None:
        raise ValueError(f"tenant name {name!r}: 1 to 64 letters, digits or _ . - (nothing else)")
    return name


def new_key() -> tuple[str, str]:
    """A fresh stored key: (public id, the key `osk_<id>_<secret>`)."""
    key_id = secrets.token_hex(6)
    return key_id, f"{KEY_PREFIX}{key_id}_{secrets.token_urlsafe(32)}"


def key_id_of(key: str) -> str | None:
    """The public id inside a stored key, or None if `key` does not look like one."""
    if not key.startswith(KEY_PREFIX):
        return None
    key_id, sep, secret = key[len(KEY_PREFIX) :].partition("_")
    return key_id if sep and secret and _KEY_ID.fullmatch(key_id) else None
