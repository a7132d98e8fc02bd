"""safetensors bodies: named tensors, with the message fields in the header's `__metadata__`.

Layout: 8-byte little-endian header length N, N bytes of JSON header, then the data section.
Encoding uses the `safetensors` package. Decoding reads the header itself, applying the same checks
as the package's Rust reader (same header size cap, each tensor's byte range must match its shape,
the ranges must tile the data section exactly) plus ours (F32 only), all before any tensor is
allocated, and then copies each tensor out of the body exactly once. `safetensors.numpy.load`
would copy every tensor (whatever its dtype) into a read-only `bytes` first, so making the arrays
writable would cost a second full copy; the test suite checks that both readers agree.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Final

import numpy as np
import orjson
from safetensors.numpy import save

from .errors import WireError, invalid_body
from .media import JSON
from .message import Message, as_float32, check_shape

METADATA_KEY: Final = "__metadata__"
MAX_HEADER_BYTES: Final = 100_000_000  # the safetensors crate refuses larger headers too
_LENGTH_BYTES: Final = 8
_F32: Final = "F32"
_F32_BYTES: Final = 4
_F32_LE: Final = np.dtype("<f4")


def _read_header(body: bytes) -> tuple[int, dict[str, Any]]:
    """The header length and the parsed header object; never reads past `body`."""
    if len(body) < _LENGTH_BYTES:
        raise invalid_body(
            f"safetensors body of {len(body)} bytes is shorter than its 8-byte header length"
        )
    header_len = int.from_bytes(body[:_LENGTH_BYTES], "little")
    if header_len > MAX_HEADER_BYTES:
        raise invalid_body(f"safetensors header of {header_len} bytes exceeds {MAX_HEADER_BYTES}")
    if header_len > len(body) - _LENGTH_BYTES:
        raise invalid_body(
            f"safetensors header length {header_len} exceeds the {len(body) - _LENGTH_BYTES} "
            "bytes that follow it"
        )
    try:
        header = orjson.loads(memoryview(body)[_LENGTH_BYTES : _LENGTH_BYTES + header_len])
    except orjson.JSONDecodeError as exc:
        raise invalid_body(f"safetensors header is not valid UTF-8 JSON: {exc}") from None
    if not isinstance(header, dict):
        raise invalid_body("safetensors header must be a JSON object")
    return header_len, header


def _decode_metadata(metadata: object) -> dict[str, Any]:
    """`__metadata__` values are JSON text; a value that is not JSON is taken as a bare string."""
    if metadata is None:
        return {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise invalid_body("safetensors __metadata__ must map strings to strings")
    fields: dict[str, Any] = {}
    for key, text in metadata.items():
        try:
            fields[key] = orjson.loads(text)
        except orjson.JSONDecodeError:
            fields[key] = text  # e.g. `worker: a` from a client that does not quote strings
    return fields


def _layout(name: str, info: object) -> tuple[int, int, list[int]]:
    """(begin, end, shape) of one header entry, checked against its dtype and shape."""
    where = f"safetensors tensor {name!r}"
    if not isinstance(info, dict):
        raise invalid_body(f"{where}: header entry must be an object")
    dtype = info.get("dtype")
    if dtype != _F32:
        raise invalid_body(f"{where} has dtype {dtype!r}; only F32 is accepted")
    shape = check_shape(where, info.get("shape"))
    offsets = info.get("data_offsets")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or any(type(o) is not int or o < 0 for o in offsets)
        or offsets[0] > offsets[1]
    ):
        raise invalid_body(f"{where}: data_offsets must be [begin, end] with 0 <= begin <= end")
    begin, end = offsets
    nbytes = math.prod(shape) * _F32_BYTES
    if end - begin != nbytes:
        raise invalid_body(
            f"{where}: shape {shape} needs {nbytes} bytes, offsets give {end - begin}"
        )
    return begin, end, shape


def decode_safetensors_message(body: bytes) -> Message:
    """A safetensors body -> Message with writable float32 arrays and JSON-decoded fields."""
    header_len, header = _read_header(body)
    fields = _decode_metadata(header.pop(METADATA_KEY, None))
    layout = {name: _layout(name, info) for name, info in header.items()}

    # Byte ranges must tile the data section: no gap, no overlap, nothing after the last tensor.
    data_len = len(body) - _LENGTH_BYTES - header_len
    cursor = 0
    for name, (begin, end, _) in sorted(layout.items(), key=lambda item: item[1][:2]):
        if begin != cursor:
            raise invalid_body(
                f"safetensors tensor {name!r}: data_offsets [{begin}, {end}] leave a gap or "
                f"overlap (the previous tensor ends at {cursor})"
            )
        cursor = end
    if cursor != data_len:
        raise invalid_body(
            f"safetensors data section is {data_len} bytes but its tensors cover {cursor}"
        )

    start = _LENGTH_BYTES + header_len
    tensors: dict[str, np.ndarray] = {}
    for name, (begin, end, shape) in layout.items():
        # np.frombuffer views the immutable body (read-only, maybe unaligned, keeping the whole
        # body alive); one astype copy per tensor yields an aligned, writable, C-contiguous
        # native float32 array that owns its memory, byte-swapping in the same pass on a
        # big-endian host.
        view = np.frombuffer(
            body, dtype=_F32_LE, count=(end - begin) // _F32_BYTES, offset=start + begin
        )
        tensors[name] = view.reshape(shape).astype(np.float32)
    return Message(tensors=tensors, fields=fields)


def encode_safetensors_message(
    tensors: Mapping[str, np.ndarray], fields: Mapping[str, Any]
) -> bytes:
    """Message parts -> safetensors bytes; each field is stored as its JSON text."""
    arrays: dict[str, np.ndarray] = {}
    for name, value in tensors.items():
        array = as_float32(name, value)
        if name == METADATA_KEY:
            raise WireError(
                "not_representable",
                f"tensor name {METADATA_KEY!r} is reserved in safetensors; request {JSON}",
            )
        # Native C-ordered float32, copied only if not already so (ascontiguousarray would turn
        # a 0-d array into shape (1,)).
        arrays[name] = array.astype(np.float32, order="C", copy=False)
    metadata = {
        key: orjson.dumps(value, option=orjson.OPT_SERIALIZE_NUMPY).decode()
        for key, value in fields.items()
    }
    return save(arrays, metadata=metadata or None)
