"""A small safetensors reader and writer: F32 tensors and a `__metadata__` of strings.

The client may depend on httpx and numpy only, so it carries the format itself instead of the
`safetensors` package (the test suite checks the two agree both ways). Layout: an 8-byte
little-endian header length N, N bytes of JSON header (padded with spaces to a multiple of 8 so
the data section is aligned, as the package does), then the tensors' bytes back to back.
The reader applies the package's checks before allocating anything (header size cap, each byte
range matches its shape, the ranges tile the data section exactly), so a malformed body fails
with a SafetensorsError naming the problem rather than with a numpy error or a huge allocation.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any, Final

import numpy as np

__all__ = ["METADATA_KEY", "SafetensorsError", "decode", "encode"]

METADATA_KEY: Final = "__metadata__"
MAX_HEADER_BYTES: Final = 100_000_000  # the safetensors crate refuses larger headers too
_LENGTH_BYTES: Final = 8
_ALIGN: Final = 8
_F32: Final = "F32"
_F32_LE: Final = np.dtype("<f4")


class SafetensorsError(ValueError):
    """The bytes are not a safetensors file this reader accepts (or the input cannot be written)."""


def encode(tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None) -> bytes:
    """float32 arrays (any shape, any byte order) and string metadata -> safetensors bytes.

    Only float32 is accepted: casting belongs to the caller, where a lossy cast is visible.
    """
    header: dict[str, Any] = {}
    if metadata:
        for key, value in metadata.items():
            if not isinstance(key, str) or not isinstance(value, str):
                raise SafetensorsError("safetensors metadata must map strings to strings")
        header[METADATA_KEY] = dict(metadata)
    chunks: list[Any] = []
    offset = 0
    for name, value in tensors.items():
        if not isinstance(name, str) or name == METADATA_KEY:
            raise SafetensorsError(f"tensor name {name!r} cannot be stored in safetensors")
        if not isinstance(value, np.ndarray) or value.dtype.kind != "f" or value.itemsize != 4:
            got = value.dtype if isinstance(value, np.ndarray) else type(value).__name__
            raise SafetensorsError(f"tensor {name!r}: expected a float32 numpy array, got {got}")
        # Little-endian C order, copied only when the array is not already so; 0-d stays 0-d.
        array = np.asarray(value, dtype=_F32_LE, order="C")
        header[name] = {
            "dtype": _F32,
            "shape": list(array.shape),
            "data_offsets": [offset, offset + array.nbytes],
        }
        offset += array.nbytes
        chunks.append(array.reshape(-1).view(np.uint8))
    try:
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    except UnicodeEncodeError as exc:  # a lone surrogate in a name or a metadata string
        raise SafetensorsError(f"safetensors header is not encodable as UTF-8: {exc}") from None
    text += b" " * (-len(text) % _ALIGN)
    # One copy of each tensor, straight into the result.
    return b"".join([len(text).to_bytes(_LENGTH_BYTES, "little"), text, *chunks])


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object hook: a name given twice would silently lose a tensor."""
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise SafetensorsError(f"safetensors header names {key!r} twice")
        result[key] = value
    return result


def _read_header(data: memoryview) -> tuple[int, dict[str, Any]]:
    if len(data) < _LENGTH_BYTES:
        raise SafetensorsError(
            f"safetensors data of {len(data)} bytes is shorter than its 8-byte header length"
        )
    header_len = int.from_bytes(data[:_LENGTH_BYTES], "little")
    if header_len > MAX_HEADER_BYTES:
        raise SafetensorsError(f"safetensors header of {header_len} bytes exceeds the limit")
    if header_len > len(data) - _LENGTH_BYTES:
        raise SafetensorsError(
            f"safetensors header length {header_len} exceeds the "
            f"{len(data) - _LENGTH_BYTES} bytes that follow it"
        )
    raw = bytes(data[_LENGTH_BYTES : _LENGTH_BYTES + header_len])
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SafetensorsError(f"safetensors header is not UTF-8 JSON: {exc}") from None
    if not isinstance(header, dict):
        raise SafetensorsError("safetensors header must be a JSON object")
    return header_len, header


def _metadata(value: object) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise SafetensorsError("safetensors __metadata__ must map strings to strings")
    return value


def _layout(name: str, info: object) -> tuple[int, int, tuple[int, ...]]:
    """(begin, end, shape) of one header entry, checked against its dtype and shape."""
    where = f"safetensors tensor {name!r}"
    if not isinstance(info, dict):
        raise SafetensorsError(f"{where}: header entry must be an object")
    if info.get("dtype") != _F32:
        raise SafetensorsError(f"{where} has dtype {info.get('dtype')!r}; only F32 is supported")
    shape = info.get("shape")
    if not isinstance(shape, list) or any(type(d) is not int or d < 0 for d in shape):
        raise SafetensorsError(f"{where}: shape must be a list of non-negative integers")
    offsets = info.get("data_offsets")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or any(type(o) is not int or o < 0 for o in offsets)
        or offsets[0] > offsets[1]
    ):
        raise SafetensorsError(f"{where}: data_offsets must be [begin, end], 0 <= begin <= end")
    begin, end = offsets
    nbytes = math.prod(shape) * _F32_LE.itemsize
    if end - begin != nbytes:
        raise SafetensorsError(
            f"{where}: shape {shape} needs {nbytes} bytes, its offsets give {end - begin}"
        )
    return begin, end, tuple(shape)


def decode(data: bytes | bytearray | memoryview) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """safetensors bytes -> (writable native float32 arrays by name, metadata strings)."""
    view = memoryview(data).cast("B")
    header_len, header = _read_header(view)
    metadata = _metadata(header.pop(METADATA_KEY, None))
    layout = {name: _layout(name, info) for name, info in header.items()}

    # The byte ranges must tile the data section: no gap, no overlap, nothing left over.
    start = _LENGTH_BYTES + header_len
    cursor = 0
    for name, (begin, end, _) in sorted(layout.items(), key=lambda item: item[1][:2]):
        if begin != cursor:
            raise SafetensorsError(
                f"safetensors tensor {name!r}: data_offsets [{begin}, {end}] leave a gap or "
                f"overlap (the previous tensor ends at {cursor})"
            )
        cursor = end
    if cursor != len(view) - start:
        raise SafetensorsError(
            f"safetensors data section is {len(view) - start} bytes but its tensors cover {cursor}"
        )

    tensors: dict[str, np.ndarray] = {}
    for name, (begin, end, shape) in layout.items():
        count = (end - begin) // _F32_LE.itemsize
        # One copy per tensor: aligned, writable, owning its memory, native byte order.
        raw = np.frombuffer(view, dtype=_F32_LE, count=count, offset=start + begin)
        tensors[name] = raw.reshape(shape).astype(np.float32)
    return tensors, metadata
