"""Media types and content negotiation: Content-Type picks the request codec, Accept the response's.

Accept follows RFC 9110 section 12.5.1: ranges with q-values, `*/*` and `type/*`, the most specific
matching range sets a type's quality. JSON wins ties because every client can read it.

Tensor responses have a variant: safetensors may carry params as BF16 (half the bytes) instead of
float32. A client asks with the media-type parameter `application/x-safetensors; dtype=bf16`
(`choose_response_format` only; `dtype=f32` names the default) or the `?dtype=` query parameter:

- The parameter on a safetensors range makes it match only that dtype, and it is more specific
  than the plain range (`application/x-safetensors;dtype=bf16, application/x-safetensors;q=0.5`
  prefers BF16). An unknown value matches nothing. On other ranges, and in
  `choose_response_type` (the state export, always float32), the parameter is ignored like every
  parameter other than q. Among equal qualities float32 wins (lossless), as JSON wins over both.
- The query parameter restricts the representations offered: `?dtype=bf16` leaves only BF16
  safetensors, so no Accept (or `*/*`) gets it, and an Accept that allows only JSON gets 406,
  since JSON carries float32 only (returning float32 JSON would silently ignore what was asked).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, NamedTuple

from .errors import WireError
from .message import BF16, F32

JSON: Final = "application/json"
SAFETENSORS: Final = "application/x-safetensors"
MEDIA_TYPES: Final = (JSON, SAFETENSORS)
#: `dtype` values of the Accept parameter (case-insensitive there) and the query parameter.
DTYPE_NAMES: Final = {"f32": F32, "bf16": BF16}
_UNKNOWN_DTYPE: Final = "unknown"


@dataclass(frozen=True, slots=True)
class ResponseFormat:
    """What a tensor response is encoded as: a media type and, for safetensors, the dtype."""

    media_type: str
    dtype: str = F32

    def __str__(self) -> str:
        if self.media_type == SAFETENSORS:
            name = next(k for k, v in DTYPE_NAMES.items() if v == self.dtype)
            return f"{SAFETENSORS}; dtype={name}"
        return self.media_type


# Offered in this order, which also breaks ties: JSON, then lossless float32, then BF16.
_FORMATS: Final = (
    ResponseFormat(JSON),
    ResponseFormat(SAFETENSORS),
    ResponseFormat(SAFETENSORS, BF16),
)


class _Range(NamedTuple):
    kind: str
    subtype: str
    q: float
    dtype: str | None  # the `dtype` parameter (F32, BF16, _UNKNOWN_DTYPE) or None if absent


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


def _parse_dtype(params: list[str]) -> str | None:
    """The `dtype` parameter of one media range (quotes allowed), or None if it has none."""
    for param in params:
        name, _, value = param.partition("=")
        if name.strip().lower() == "dtype":
            return DTYPE_NAMES.get(value.strip().strip('"').lower(), _UNKNOWN_DTYPE)
    return None


def _parse_accept(accept: str) -> list[_Range]:
    """Valid media ranges; malformed ranges are dropped."""
    ranges: list[_Range] = []
    for item in accept.split(","):
        media_range, *params = item.split(";")
        kind, slash, subtype = media_range.strip().lower().partition("/")
        if not slash or not kind or not subtype or (kind == "*" and subtype != "*"):
            continue
        q = _parse_q(params)
        if q is not None:
            ranges.append(_Range(kind, subtype, q, _parse_dtype(params)))
    return ranges


def _quality(media_type: str, ranges: list[_Range], dtype: str | None = None) -> float:
    """q of the most specific range matching `media_type` (0 when none does).

    With a `dtype`, a safetensors range's own dtype parameter must equal it and then beats a
    range without one; without, dtype parameters are ignored.
    """
    kind, _, subtype = media_type.partition("/")
    best_specificity, best_q = -1, 0.0
    for r_kind, r_subtype, q, r_dtype in ranges:
        if r_kind == kind and r_subtype == subtype:
            specificity = 2
            if dtype is not None and media_type == SAFETENSORS and r_dtype is not None:
                if r_dtype != dtype:
                    continue
                specificity = 3
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


def choose_response_format(accept: str | None, dtype: str | None = None) -> ResponseFormat:
    """The response codec and tensor dtype for an Accept header and a `?dtype=` query value.

    `dtype` is a DTYPE_NAMES key or None (the route validates it). Without a query dtype, no
    Accept (or none parseable) means JSON; with `?dtype=bf16` it means BF16 safetensors. 406
    when nothing offered is acceptable.
    """
    if dtype is not None and dtype not in DTYPE_NAMES:
        raise ValueError(f"unknown response dtype {dtype!r}")
    wanted = DTYPE_NAMES.get(dtype) if dtype is not None else None
    offers = [f for f in _FORMATS if wanted is None or f.dtype == wanted]
    ranges = _parse_accept(accept) if accept is not None else []
    if not ranges:
        return offers[0]
    best, best_q = None, 0.0
    for offer in offers:
        q = _quality(offer.media_type, ranges, offer.dtype)
        if q > best_q:
            best, best_q = offer, q
    if best is not None:
        return best
    detail = f"Accept {accept!r} allows none of: {', '.join(map(str, offers))}"
    if wanted == BF16:
        detail += f" (?dtype={dtype} is served as {SAFETENSORS} only; JSON carries float32)"
    raise WireError("not_acceptable", detail)
