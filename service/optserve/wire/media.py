"""Media types and content negotiation: Content-Type picks the request codec, Accept the response's.

Accept follows RFC 9110 section 12.5.1: ranges with q-values, `*/*` and `type/*`, the most specific
matching range sets a type's quality. Media-type parameters other than q are ignored (neither codec
has variants). JSON wins ties because every client can read it.
"""

from __future__ import annotations

from typing import Final

from .errors import WireError

JSON: Final = "application/json"
SAFETENSORS: Final = "application/x-safetensors"
MEDIA_TYPES: Final = (JSON, SAFETENSORS)


def _essence(media_type: str) -> str:
    """`Application/JSON; charset=utf-8` -> `application/json`."""
    return media_type.split(";", 1)[0].strip().lower()


def request_media_type(content_type: str | None) -> str:
    """The codec for a request body; a missing or blank Content-Type means JSON."""
    if content_type is None or not content_type.strip():
        return JSON
    essence = _essence(content_type)
    if essence in MEDIA_TYPES:
        return essence
    raise WireError(
        "unsupported_media_type",
        f"Content-Type {content_type!r} is not supported; use {JSON} or {SAFETENSORS}",
    )


def _parse_q(params: list[str]) -> float | None:
    """The q weight of one media range (1.0 if absent), or None if it is malformed."""
    for param in params:
        name, _, value = param.partition("=")
        if name.strip().lower() != "q":
            continue
        try:
            q = float(value.strip())
        except ValueError:
            return None
        # float() also takes "nan" and "inf"; a weight outside [0, 1] makes the range malformed.
        return q if 0.0 <= q <= 1.0 else None
    return 1.0


def _parse_accept(accept: str) -> list[tuple[str, str, float]]:
    """Valid media ranges as (type, subtype, q); malformed ranges are dropped."""
    ranges: list[tuple[str, str, float]] = []
    for item in accept.split(","):
        media_range, *params = item.split(";")
        kind, slash, subtype = media_range.strip().lower().partition("/")
        if not slash or not kind or not subtype or (kind == "*" and subtype != "*"):
            continue
        q = _parse_q(params)
        if q is not None:
            ranges.append((kind, subtype, q))
    return ranges


def _quality(media_type: str, ranges: list[tuple[str, str, float]]) -> float:
    """q of the most specific range matching `media_type` (0 when none does)."""
    kind, _, subtype = media_type.partition("/")
    best_specificity, best_q = -1, 0.0
    for r_kind, r_subtype, q in ranges:
        if r_kind == kind and r_subtype == subtype:
            specificity = 2
        elif r_kind == kind and r_subtype == "*":
            specificity = 1
        elif r_kind == "*":
            specificity = 0
        else:
            continue
        if specificity > best_specificity:
            best_specificity, best_q = specificity, q
        elif specificity == best_specificity:
            best_q = max(best_q, q)
    return best_q


def choose_response_type(accept: str | None) -> str:
    """The response codec for an Accept header: JSON unless safetensors ranks strictly higher.

    No header, or one with no parseable range, means "anything" (RFC 9110 lets a server disregard
    an invalid Accept); a valid header that excludes both types is a 406.
    """
    if accept is None:
        return JSON
    ranges = _parse_accept(accept)
    if not ranges:
        return JSON
    q_json = _quality(JSON, ranges)
    q_safetensors = _quality(SAFETENSORS, ranges)
    if q_safetensors > q_json:
        return SAFETENSORS
    if q_json > 0.0:
        return JSON
    raise WireError(
        "not_acceptable",
        f"Accept {accept!r} allows neither {JSON} nor {SAFETENSORS}",
    )
