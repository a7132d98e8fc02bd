"""JSON bodies: `{"<tensor_field>": {name: {"shape": [...], "data": [...]}}, ...fields}`.

orjson parses the text and numpy converts each tensor's number list in one call; nothing walks the
elements in Python on the happy path. Measured on 1M floats, the conversion adds about a third to
orjson's parse; the check for JSON booleans adds another third only when most values are exactly
0 or 1 (see `_holds_bool`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Final

import numpy as np
import orjson

from .errors import WireError, invalid_body
from .message import Message, as_float32, check_shape, json_type

_OPTIONS: Final = orjson.OPT_SERIALIZE_NUMPY
_TENSOR_KEYS: Final = frozenset({"shape", "data", "dtype"})


def decode_json_object(body: bytes) -> dict[str, Any]:
    """Parse a body that must be one JSON object (400 `invalid_body` otherwise)."""
    if not body:
        raise invalid_body("the request body is empty; expected a JSON object")
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise invalid_body(f"the body is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise invalid_body(f"the body must be a JSON object, not {json_type(value)}")
    return value


def encode_json(value: Any) -> bytes:
    """orjson with numpy support, for bodies without tensors (NaN becomes null, as orjson does)."""
    return orjson.dumps(value, option=_OPTIONS)


def _first_non_number(data: list[Any]) -> str:
    """Describe the first element that is not a JSON number (error path only)."""
    for index, item in enumerate(data):
        if type(item) not in (int, float):
            return f"data[{index}] is {json_type(item)}, not a number"
    return "data holds values that are not numbers"


def _holds_bool(data: list[Any], values: np.ndarray) -> bool:
    """Whether a list numpy read as numbers contains JSON true/false.

    numpy promotes [true, 1.5] to [1.0, 1.5] silently, so look at the types, but only where
    a bool could hide: elements equal to 0 or 1. Typical gradients have few such values.
    """
    candidates = np.flatnonzero((values == 0) | (values == 1))
    if candidates.size == 0:
        return False
    if candidates.size * 4 > values.size:
        return bool in set(map(type, data))  # one C-speed pass beats indexing most of the list
    return any(type(data[i]) is bool for i in candidates.tolist())


def decode_json_tensor(where: str, spec: object) -> np.ndarray:
    """One decoded `{"shape", "data"}` object -> an owned float32 array of that shape.

    Public for documents that nest tensors deeper than one field (the state export);
    `where` names the tensor in error details.
    """
    if not isinstance(spec, dict):
        raise invalid_body(f"{where} must be an object with shape and data, not {json_type(spec)}")
    unknown = spec.keys() - _TENSOR_KEYS
    if unknown:
        raise invalid_body(f"{where} has unknown members {sorted(unknown)}; expected shape, data")
    if spec.get("dtype", "float32") != "float32":
        raise invalid_body(f"{where}: dtype {spec['dtype']!r} is not supported; use float32")
    if "shape" not in spec or "data" not in spec:
        missing = "shape" if "shape" not in spec else "data"
        raise invalid_body(f"{where} is missing {missing!r}")
    shape, data = check_shape(where, spec["shape"]), spec["data"]
    if not isinstance(data, list):
        raise invalid_body(f"{where}: data must be a flat array of numbers, not {json_type(data)}")
    count = math.prod(shape)
    if len(data) != count:
        raise invalid_body(f"{where}: shape {shape} needs {count} numbers, data has {len(data)}")
    try:
        # One conversion that also infers the element type, which exposes strings (kind U),
        # null and objects (kind O), nesting (ndim > 1) and all-bool data (kind b).
        values = np.asarray(data)
    except ValueError:  # ragged nesting such as [[1], 2]
        raise invalid_body(f"{where}: data must be a flat array of numbers") from None
    if values.ndim != 1:
        raise invalid_body(f"{where}: data must be a flat array of numbers, not nested arrays")
    if values.dtype.kind not in "fiu":
        if values.dtype.kind != "O" or any(type(item) not in (int, float) for item in data):
            raise invalid_body(f"{where}: {_first_non_number(data)}")
        values = np.asarray(data, dtype=np.float64)  # integers beyond int64 next to others
    if _holds_bool(data, values):
        raise invalid_body(f"{where}: {_first_non_number(data)}")
    with np.errstate(over="ignore"):  # beyond float32's range rounds to +-inf, as IEEE says
        return values.reshape(shape).astype(np.float32)


def decode_json_message(body: bytes, tensor_field: str, required: bool = True) -> Message:
    """A JSON body -> Message; the tensors sit under `tensor_field`, every other key is a field.

    With `required=False` a body without `tensor_field` is a message with no tensors.
    """
    fields = decode_json_object(body)
    if tensor_field not in fields:
        if not required:
            return Message(tensors={}, fields=fields)
        raise invalid_body(f"the body is missing {tensor_field!r}")
    raw = fields.pop(tensor_field)
    if not isinstance(raw, dict):
        raise invalid_body(
            f"{tensor_field!r} must be an object of named tensors, not {json_type(raw)}"
        )
    tensors = {
        name: decode_json_tensor(f"{tensor_field}[{name!r}]", spec) for name, spec in raw.items()
    }
    return Message(tensors=tensors, fields=fields)


# Magnitudes whose shortest float32 text comes back wrong through a double (bits 0x15ae43fd).
# orjson prints a float32 array as the shortest decimal that rounds to the same float32. Readers
# that parse into a double first (orjson itself, JSON.parse, Python's json, serde) round twice,
# and where that decimal's nearest double is exactly the tie between two float32s, ties-to-even
# picks the neighbour: 0x15ae43fd prints as 7.038531e-26, which reads back as 0x15ae43fe.
# Checking every positive finite float32 (tests/test_wire.py, OPTSERVE_WIRE_EXHAUSTIVE=1) finds
# this one value; its negative is the only other. Tensors holding one are printed as float64
# text, which every reader parses exactly, at about twice the bytes, so others keep the short form.
DOUBLE_ROUNDING_TRAPS: Final = np.array([0x15AE43FD], dtype=np.uint32).view(np.float32)


def encode_json_tensor(name: str, value: np.ndarray) -> dict[str, Any]:
    """A float32 array -> `{"shape", "data"}` ready for `encode_json` (data stays a numpy array)."""
    array = as_float32(name, value)
    # C order and native byte order let orjson print straight from the buffer; no copy if so.
    flat = array.astype(np.float32, order="C", copy=False).reshape(-1)
    if not np.isfinite(flat).all():
        raise WireError(
            "not_representable",
            f"tensor {name!r} holds NaN or infinity, which JSON cannot carry; "
            "request application/x-safetensors instead",
        )
    if np.isin(np.abs(flat), DOUBLE_ROUNDING_TRAPS).any():
        flat = flat.astype(np.float64)
    return {"shape": list(array.shape), "data": flat}


def encode_json_message(
    tensors: Mapping[str, np.ndarray], fields: Mapping[str, Any], tensor_field: str
) -> bytes:
    """Message parts -> JSON bytes; fields first so small values like `version` lead the body."""
    if tensor_field in fields:
        raise ValueError(f"field {tensor_field!r} collides with the tensor field")
    body = dict(fields)
    body[tensor_field] = {name: encode_json_tensor(name, array) for name, array in tensors.items()}
    return orjson.dumps(body, option=_OPTIONS)
