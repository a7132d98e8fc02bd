"""What both codecs decode to and encode from: named float32 tensors plus scalar fields."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Final

import numpy as np

from .errors import invalid_body

MAX_NDIM: Final = 64  # numpy's own limit; a longer shape cannot become an array
#: numpy refuses a shape whose non-zero dimensions span more bytes than its index type holds,
#: even when a zero dimension makes the array empty; 8 bytes is the widest element decoded.
#: (A shape without a zero that large never gets that far: its byte or number count is wrong.)
_MAX_SPAN: Final = np.iinfo(np.intp).max // 8

# Tensor dtypes on the wire, by their safetensors names. Decoded tensors are always float32;
# F16 and BF16 are wire formats only (see safetensors_codec.py).
F32: Final = "F32"
F16: Final = "F16"
BF16: Final = "BF16"


@dataclass(slots=True)
class Message:
    """A decoded body. Tensors are writable, C-contiguous, native float32 arrays the caller owns."""

    tensors: dict[str, np.ndarray] = field(default_factory=dict)
    fields: dict[str, Any] = field(default_factory=dict)


def as_float32(name: str, value: np.ndarray | np.float32) -> np.ndarray:
    """Encoders take float32 only (casting would hide a dtype bug); numpy scalars count as 0-d."""
    if (
        not isinstance(value, (np.ndarray, np.generic))
        or value.dtype.kind != "f"
        or value.dtype.itemsize != 4
    ):
        got = value.dtype if isinstance(value, (np.ndarray, np.generic)) else type(value).__name__
        raise TypeError(f"tensor {name!r}: expected a float32 numpy array, got {got}")
    return np.asarray(value)


def json_type(value: object) -> str:
    """The JSON name of a decoded value, for error messages a client can act on."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def check_shape(where: str, shape: object) -> list[int]:
    """`shape` as a list of non-negative ints, or 400 `invalid_body` naming `where`."""
    if not isinstance(shape, list):
        raise invalid_body(f"{where}: shape must be an array of integers, not {json_type(shape)}")
    if len(shape) > MAX_NDIM:
        raise invalid_body(f"{where}: shape has {len(shape)} dimensions; at most {MAX_NDIM} work")
    for dim in shape:
        # type() rather than isinstance(): JSON true is a bool, and bool is an int subclass.
        if type(dim) is not int or dim < 0:
            raise invalid_body(f"{where}: shape must be non-negative integers, got {shape!r}")
    if 0 in shape and math.prod(dim for dim in shape if dim) > _MAX_SPAN:
        raise invalid_body(f"{where}: empty shape {shape!r} is still too large for an array")
    return shape
