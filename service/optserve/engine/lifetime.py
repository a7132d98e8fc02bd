"""Session lifetime: the idle TTL (`ttl_s`) a session is created or patched with.

A session with a TTL disappears, with every key it has, once it goes unused for that long; any
push, pull, read or write renews it (the store keeps the expiry in Redis itself, see
store/redis_store.py). The server may set a default for sessions created without one, and a
maximum that also forbids sessions that never expire.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..store.keys import TTL_FIELD
from .errors import invalid_session

#: Sessions may not expire sooner than this (a TTL below a round trip would be useless).
MIN_TTL_MS = 100
#: Nor later than this (100 years): a longer one means "never", which is null.
MAX_TTL_S = 100 * 365 * 86_400


@dataclass(frozen=True)
class Lifetime:
    """The server's TTL policy: `default_s` for sessions that name none, `max_s` as a cap."""

    default_s: float | None = None
    max_s: float | None = None

    def ttl_ms(self, fields: Mapping[str, Any], *, creating: bool) -> int | None:
        """The TTL in ms that `fields["ttl_s"]` asks for (None: never expires)."""
        value = self.default_s if "ttl_s" not in fields and creating else fields.get("ttl_s")
        if value is None:
            if self.max_s is not None:
                raise invalid_session(
                    f'"ttl_s" is required: this server keeps idle sessions at most {self.max_s} s'
                )
            return None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise invalid_session('"ttl_s" must be a number of seconds or null')
        if not math.isfinite(value):
            raise invalid_session('"ttl_s" must be a number of seconds or null')
        # Checked before the ms exist: +-1e308 s overflow round() or Redis' expire arithmetic.
        if value > MAX_TTL_S:
            raise invalid_session(f'"ttl_s" may be at most {MAX_TTL_S} s; null never expires')
        if value < MIN_TTL_MS / 1000:
            raise invalid_session(f'"ttl_s" must be at least {MIN_TTL_MS / 1000} s')
        ms = max(MIN_TTL_MS, round(value * 1000))
        if self.max_s is not None and value > self.max_s:
            raise invalid_session(f'"ttl_s" may be at most {self.max_s} s on this server')
        return ms


def ttl_s_of(meta: Mapping[str, str]) -> float | None:
    """The session's TTL in seconds as the API shows it, from its stored meta."""
    raw = meta.get(TTL_FIELD)
    return int(raw) / 1000 if raw else None
