"""The optimizer-state document in both media types.

JSON nests it as the issue's contract shows: `{"tensors": {"w": {"param": tensor, "step": 13,
"exp_avg": tensor}}, ...}`. safetensors is flat, so each array is named `<tensor>/<state name>`
(split at the last "/", since state names never contain one) and the scalars travel in the header
metadata as `"scalars": {"w": {"step": 13}}` beside the other fields.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..engine.errors import invalid_session
from ..wire import (
    JSON,
    SAFETENSORS,
    choose_response_type,
    decode_json_object,
    decode_json_tensor,
    decode_message,
    encode_json,
    encode_json_tensor,
    encode_message,
)

STATE_FIELDS = ("version", "optimizer", "lr_schedule", "lr_schedule_state")


def encode_state(exported: dict[str, Any], accept: str | None) -> tuple[bytes, str]:
    media_type = choose_response_type(accept)
    fields = {k: exported[k] for k in STATE_FIELDS}
    if media_type == JSON:
        tensors = {
            name: {
                key: encode_json_tensor(f"{name}/{key}", value)
                if isinstance(value, np.ndarray)
                else value
                for key, value in entry.items()
            }
            for name, entry in exported["tensors"].items()
        }
        return encode_json({**fields, "tensors": tensors}), JSON
    flat: dict[str, np.ndarray] = {}
    scalars: dict[str, dict[str, float]] = {}
    for name, entry in exported["tensors"].items():
        for key, value in entry.items():
            if isinstance(value, np.ndarray):
                flat[f"{name}/{key}"] = value
            else:
                scalars.setdefault(name, {})[key] = value
    return encode_message(flat, {**fields, "scalars": scalars}, "tensors", SAFETENSORS), SAFETENSORS


def decode_state(body: bytes, safetensors: bool) -> dict[str, Any]:
    """{"tensors": {name: {"param": array, state...}}, "optimizer"?, "lr_schedule_state"?}."""
    if safetensors:
        message = decode_message(body, SAFETENSORS, "tensors")
        tensors: dict[str, dict[str, Any]] = {}
        for flat_name, array in message.tensors.items():
            name, sep, key = flat_name.rpartition("/")
            if not sep or not name:
                raise invalid_session(f"state tensor {flat_name!r} is not named <tensor>/<state>")
            tensors.setdefault(name, {})[key] = array
        scalars = message.fields.get("scalars") or {}
        if not isinstance(scalars, dict):
            raise invalid_session('"scalars" must map tensor names to {"step": ...}')
        for name, values in scalars.items():
            if not isinstance(values, dict):
                raise invalid_session(f'"scalars.{name}" must be an object')
            tensors.setdefault(name, {}).update(values)
        fields = message.fields
    else:
        fields = decode_json_object(body)
        raw = fields.get("tensors")
        if not isinstance(raw, dict):
            raise invalid_session('"tensors" must map tensor names to their state')
        tensors = {}
        for name, entry in raw.items():
            if not isinstance(entry, dict):
                raise invalid_session(f'"tensors.{name}" must be an object')
            tensors[name] = {
                key: decode_json_tensor(f"tensors.{name}.{key}", value)
                if isinstance(value, dict)
                else value
                for key, value in entry.items()
            }
    unknown = set(fields) - {*STATE_FIELDS, "tensors", "scalars"}
    if unknown:
        raise invalid_session(f"unknown state field(s): {', '.join(sorted(unknown))}")
    state: dict[str, Any] = {"tensors": tensors}
    for key in ("optimizer", "lr_schedule_state", "lr_schedule"):
        if fields.get(key) is not None:
            if not isinstance(fields[key], dict):
                raise invalid_session(f'"{key}" must be an object')
            state[key] = fields[key]
    version = fields.get("version")
    if version is not None:
        if isinstance(version, bool) or not isinstance(version, int) or version < 0:
            raise invalid_session('"version" must be a non-negative integer')
        state["version"] = version
    return state
