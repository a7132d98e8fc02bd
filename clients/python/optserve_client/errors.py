"""One exception for everything that goes wrong talking to optserve.

Callers branch on `code` (the server's stable problem code, e.g. "session_not_found",
"precondition_failed", or the client's own "transport_error" / "invalid_response"), never on
exception classes or message text, so a new server error needs no new client release.
"""

from __future__ import annotations

from typing import Any

import httpx

__all__ = ["OptservError"]


class OptservError(Exception):
    """A server problem (RFC 9457), a transport failure, or a response the client cannot read.

    `status` is the HTTP status (None when no response arrived), `code` the stable error code,
    `detail` the human explanation, `problem` the full problem document with any extra members
    (for example `version` on a 412 or a 409 `stale_gradient`, `field` and `allowed` on an
    invalid hyperparameter). `attempts` is how many times the client tried the call, retries
    included, before giving up with this error.
    """

    status: int | None
    code: str
    detail: str
    problem: dict[str, Any]
    attempts: int

    def __init__(
        self,
        status: int | None,
        code: str,
        detail: str,
        problem: dict[str, Any] | None = None,
    ) -> None:
        self.status = status
        self.code = code
        self.detail = detail
        self.problem = problem if problem is not None else {"code": code, "detail": detail}
        self.attempts = 1
        super().__init__(f"{status if status is not None else '-'} {code}: {detail}")

    def __repr__(self) -> str:
        return f"OptservError({self.status!r}, {self.code!r}, {self.detail!r})"

    @classmethod
    def from_response(cls, response: httpx.Response) -> OptservError:
        """An error response -> OptservError; bodies that are not problem documents still map."""
        problem: dict[str, Any] | None = None
        try:
            body = response.json()
            if isinstance(body, dict):
                problem = body
        except ValueError:  # not JSON: a proxy's HTML page, an empty body
            pass
        if problem is None:
            text = response.text.strip()[:500]
            problem = {
                "status": response.status_code,
                "title": response.reason_phrase,
                "detail": text or response.reason_phrase,
            }
        code = problem.get("code")
        detail = problem.get("detail") or problem.get("title") or response.reason_phrase
        return cls(
            response.status_code,
            code if isinstance(code, str) and code else "http_error",
            str(detail),
            problem,
        )

    @classmethod
    def from_transport(cls, exc: httpx.RequestError) -> OptservError:
        """No usable response at all: connection refused, timeout, broken stream."""
        detail = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        return cls(None, "transport_error", detail)

    @classmethod
    def invalid_response(cls, response: httpx.Response, detail: str) -> OptservError:
        """A success status whose body the client cannot decode (a server or proxy bug)."""
        return cls(response.status_code, "invalid_response", detail)
