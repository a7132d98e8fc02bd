"""What the store reports; the engine turns these into API errors or retries."""

from __future__ import annotations


class StartupRefused(RuntimeError):
    """The server must not start as configured (open on a public address, a store that is not
    what the settings say): the message says what to change, and is all the operator sees."""


class StoreError(Exception):
    """Base of store errors."""


class StoreUnavailable(StoreError):
    """Redis cannot be reached or failed mid-command; nothing was acknowledged."""


class SessionGone(StoreError):
    """The session does not exist (never created, deleted, or expired)."""


class IdempotencyConflict(StoreError):
    """An idempotency record the commit would create already exists: another request with the
    same key committed first. Nothing was applied; read the record and replay it."""


class VersionConflict(StoreError):
    """The session moved on since it was read: the compare-and-set commit did not apply."""

    def __init__(self, current: int) -> None:
        self.current = current
        super().__init__(f"session is at version {current}")
