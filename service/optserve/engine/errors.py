"""Engine errors: each carries the API's stable `code` and what a client should know."""

from __future__ import annotations

from typing import Any


class EngineError(Exception):
    """A request the engine refuses; nothing was changed. `extra` goes into the problem body."""

    def __init__(self, code: str, detail: str, **extra: Any) -> None:
        self.code = code
        self.detail = detail
        self.extra = extra
        super().__init__(detail)


def not_found(sid: str) -> EngineError:
    return EngineError("session_not_found", f"no session {sid!r}")


def invalid_session(detail: str, **extra: Any) -> EngineError:
    return EngineError("invalid_session", detail, **extra)
