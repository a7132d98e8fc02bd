"""The optimizer-state document (a checkpoint) in both media types, as one Python shape.

Callers always see `{"version", "optimizer", "lr_schedule", "lr_schedule_state",
"tensors": {name: {"param": ndarray, "step": float, "exp_avg": ndarray, ...}}}`, whatever the
codec. JSON nests it that way on the wire; safetensors is flat, so each array travels as
`<tensor>/<state name>` (split at the last "/": state names never hold one, tensor names may)
and the scalars as metadata `"scalars": {name: {"step": 13.0}}` beside the other fields.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from . import _safetensors
from ._wire import (
    JSON,
    SAFETENSORS,
    WireError,
    decode_json_tensor,
    decode_metadata,
    dumps,
    encode_json_tensor,
    encode_metadata,
    loads,
    media_type,
    to_float32,
)


def _is_scalar(value: Any) -> bool:
    """Scalars (`step`) are numbers; everything array-like, 0-d arrays included, is a tensor."""
    return isinstance(value, int | float | np.generic) and not isinstance(value, bool | np.bool_)


def encode_state(document: Mapping[str, Any], codec: str) -> tuple[bytes, str]:
    """A state document -> (body, Content-Type); every field but `tensors` is passed through."""
    entries = document.get("tensors")
    if not isinstance(entries, Mapping):
        raise WireError('a state document needs "tensors": {name: {"param": array, ...}}')
    fields = {key: value for key, value in document.items() if key != "tensors"}
    if codec == "json":
        tensors = {
            name: {
                key: float(v) if _is_scalar(v) else encode_json_tensor(f"{name}/{key}", v)
                for key, v in entry.items()
            }
            for name, entry in entries.items()
        }
        return dumps({**fields, "tensors": tensors}), JSON
    flat: dict[str, np.ndarray] = {}
    scalars: dict[str, dict[str, float]] = {}
    for name, entry in entries.items():
        for key, value in entry.items():
            if _is_scalar(value):
                scalars.setdefault(name, {})[key] = float(value)
            else:
                flat[f"{name}/{key}"] = to_float32(f"{name}/{key}", value)
    metadata = encode_metadata({**fields, "scalars": scalars})
    try:
        return _safetensors.encode(flat, metadata), SAFETENSORS
    except _safetensors.SafetensorsError as exc:
        raise WireError(str(exc)) from None


def decode_state(content: bytes, content_type: str | None) -> dict[str, Any]:
    """A GET /state response -> the document with numpy arrays and float scalars."""
    if media_type(content_type) == SAFETENSORS:
        try:
            flat, metadata = _safetensors.decode(content)
        except _safetensors.SafetensorsError as exc:
            raise WireError(str(exc)) from None
        fields = decode_metadata(metadata)
        tensors: dict[str, dict[str, Any]] = {}
        for flat_name, array in flat.items():
            name, sep, key = flat_name.rpartition("/")
            if not sep:
                raise WireError(f"state tensor {flat_name!r} is not named <tensor>/<state>")
            tensors.setdefault(name, {})[key] = array
        scalars = fields.pop("scalars", None) or {}
        if not isinstance(scalars, dict):
            raise WireError('"scalars" in the state metadata is not an object')
        for name, values in scalars.items():
            if not isinstance(values, dict):
                raise WireError(f'"scalars.{name}" in the state metadata is not an object')
            entry = tensors.setdefault(name, {})
            entry.update({key: float(value) for key, value in values.items()})
        return {**fields, "tensors": tensors}
    fields = loads(content)
    if not isinstance(fields, dict) or not isinstance(fields.get("tensors"), dict):
        raise WireError('the state response has no "tensors" object')
    decoded: dict[str, dict[str, Any]] = {}
    for name, entry in fields["tensors"].items():
        if not isinstance(entry, dict):
            raise WireError(f'"tensors.{name}" in the state response is not an object')
        decoded[name] = {
            key: decode_json_tensor(f"tensors.{name}.{key}", value)
            if isinstance(value, dict)
            else float(value)
            for key, value in entry.items()
        }
    return {**fields, "tensors": decoded}
