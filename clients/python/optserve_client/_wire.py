"""Message bodies in both media types: named float32 tensors plus JSON-able fields.

JSON: `{"<tensor_field>": {name: {"shape": [...], "data": [flat, row-major]}}, ...fields}`.
safetensors: the tensors at top level, each field as its JSON text in `__metadata__`.

Exactness: float32 values are written as the decimal of their float64 widening, which every JSON
reader parses back to the same double and so to the same float32 (the server's shortest-float32
form is a third smaller but needs its double-rounding special case; correctness wins here, and
the default codec is binary anyway). Decoding reads each number as a double and rounds it to
float32 once, which is exact for everything the server prints.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any, Final

import numpy as np

from . import _safetensors

JSON: Final = "application/json"
PROBLEM_JSON: Final = "application/problem+json"
SAFETENSORS: Final = "application/x-safetensors"
CODECS: Final = {"json": JSON, "safetensors": SAFETENSORS}


class WireError(ValueError):
    """A body the client cannot encode, or a response it cannot decode."""


def media_type(content_type: str | None) -> str:
    """`Application/JSON; charset=utf-8` -> `application/json` (missing means JSON)."""
    if not content_type:
        return JSON
    return content_type.split(";", 1)[0].strip().lower()


def to_float32(name: str, value: Any) -> np.ndarray:
    """User input (any numeric array-like) -> float32 array; the cast is the client's contract."""
    try:
        array = np.asarray(value, dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise WireError(f"tensor {name!r} is not a numeric array: {exc}") from None
    return array


def _json_default(value: Any) -> Any:
    """Let numpy scalars and arrays appear in hyperparameters and metadata."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def dumps(value: Any) -> bytes:
    """Compact JSON; NaN and infinity are refused since the server's parser refuses them too."""
    try:
        return json.dumps(
            value, separators=(",", ":"), allow_nan=False, default=_json_default
        ).encode()
    except ValueError as exc:
        raise WireError(f"cannot encode as JSON: {exc}") from None


def loads(content: bytes) -> Any:
    try:
        return json.loads(content)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise WireError(f"the response is not valid JSON: {exc}") from None


def encode_json_tensor(name: str, value: Any) -> dict[str, Any]:
    """A tensor -> `{"shape", "data"}` whose numbers read back as exactly the same float32s."""
    array = to_float32(name, value)
    if not np.isfinite(array).all():
        raise WireError(
            f"tensor {name!r} holds NaN or infinity, which JSON cannot carry; "
            'use codec="safetensors"'
        )
    return {"shape": list(array.shape), "data": array.astype(np.float64).reshape(-1).tolist()}


def decode_json_tensor(where: str, spec: Any) -> np.ndarray:
    """`{"shape", "data"}` -> a float32 array of that shape."""
    if not isinstance(spec, dict) or "shape" not in spec or "data" not in spec:
        raise WireError(f"{where} is not a tensor object with shape and data")
    shape, data = spec["shape"], spec["data"]
    if not isinstance(shape, list) or any(type(d) is not int or d < 0 for d in shape):
        raise WireError(f"{where}: shape must be a list of non-negative integers")
    if not isinstance(data, list) or len(data) != math.prod(shape):
        raise WireError(f"{where}: data must be a flat list of {math.prod(shape)} numbers")
    try:
        return np.array(data, dtype=np.float32).reshape(shape)
    except (TypeError, ValueError) as exc:
        raise WireError(f"{where}: data must be numbers: {exc}") from None


def encode_metadata(fields: Mapping[str, Any]) -> dict[str, str]:
    """Each field as its JSON text, as the server reads safetensors metadata."""
    return {key: dumps(value).decode() for key, value in fields.items()}


def decode_metadata(metadata: Mapping[str, str]) -> dict[str, Any]:
    """JSON texts back to values; a text that is not JSON is a bare string."""
    fields: dict[str, Any] = {}
    for key, text in metadata.items():
        try:
            fields[key] = json.loads(text)
        except json.JSONDecodeError:
            fields[key] = text
    return fields


def encode_message(
    codec: str,
    tensor_field: str,
    tensors: Mapping[str, Any],
    fields: Mapping[str, Any],
) -> tuple[bytes, str]:
    """(body, Content-Type) for tensors and fields in `codec` ("json" or "safetensors")."""
    if codec == "json":
        body = {key: value for key, value in fields.items() if key != tensor_field}
        body[tensor_field] = {name: encode_json_tensor(name, v) for name, v in tensors.items()}
        return dumps(body), JSON
    arrays = {name: to_float32(name, value) for name, value in tensors.items()}
    try:
        return _safetensors.encode(arrays, encode_metadata(fields)), SAFETENSORS
    except _safetensors.SafetensorsError as exc:
        raise WireError(str(exc)) from None


def decode_message(
    content: bytes, content_type: str | None, tensor_field: str
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """A response body -> (tensors, other fields), whichever media type the server chose."""
    if media_type(content_type) == SAFETENSORS:
        try:
            tensors, metadata = _safetensors.decode(content)
        except _safetensors.SafetensorsError as exc:
            raise WireError(str(exc)) from None
        return tensors, decode_metadata(metadata)
    fields = loads(content)
    if not isinstance(fields, dict):
        raise WireError("the response is not a JSON object")
    raw = fields.pop(tensor_field, None) or {}
    if not isinstance(raw, dict):
        raise WireError(f"{tensor_field!r} in the response is not an object")
    tensors = {
        name: decode_json_tensor(f"{tensor_field}[{name!r}]", spec) for name, spec in raw.items()
    }
    return tensors, fields
