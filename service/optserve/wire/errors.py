"""The one error the wire layer raises; the API layer maps it to problem+json without guessing."""

from __future__ import annotations

from typing import Final

# code -> (HTTP status, problem title). The codes are stable API error codes.
_KINDS: Final[dict[str, tuple[int, str]]] = {
    "invalid_body": (400, "Malformed request body"),
    "unsupported_media_type": (415, "Unsupported media type"),
    "not_acceptable": (406, "Not acceptable"),
    # The chosen response type cannot carry the data (NaN/inf in JSON, a name safetensors reserves).
    "not_representable": (406, "Not representable in the requested media type"),
}


class WireError(Exception):
    """A body or a media type the wire layer cannot handle; `code` and `status` go on the wire."""

    code: str
    status: int
    title: str
    detail: str

    def __init__(self, code: str, detail: str) -> None:
        if code not in _KINDS:
            raise ValueError(f"unknown wire error code {code!r}")
        self.code = code
        self.status, self.title = _KINDS[code]
        self.detail = detail
        super().__init__(detail)

    def __repr__(self) -> str:
        return f"WireError({self.code!r}, {self.detail!r})"


def invalid_body(detail: str) -> WireError:
    """Shorthand for the most common error: the client's bytes are not a valid message."""
    return WireError("invalid_body", detail)
