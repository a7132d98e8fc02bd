"""safetensors bodies: named tensors, with the message fields in the header's `__metadata__`.

Layout: 8-byte little-endian header length N, N bytes of JSON header, then the data section.
Decoding reads the header itself, applying the same checks as the package's Rust reader (same
header size cap, each tensor's byte range must match its shape and dtype, the ranges must tile the
data section exactly) plus ours (the dtypes the caller allows), all before any tensor is
allocated. Then each aligned F32 tensor of a writable body (a buffer) is a view of it, and any
other tensor is converted out of the body in one pass. `safetensors.numpy.load` would copy every
tensor (whatever its dtype) into a read-only `bytes` first, so making the arrays writable would
cost a second full copy; the test suite checks that both readers agree.

Half-precision input (the "cheaper wire"): with `upcast=True` a body may also hold F16 and BF16
tensors, which decode to float32 exactly (every F16 and BF16 value is a float32 value): F16 through
numpy's float16 -> float32 cast, BF16 by moving its 16 bits to the top of a 32-bit word. The API
allows this for gradients and for a new session's initial params only; see api/sessions.py.

Encoding F32 uses the `safetensors` package, or a `SafetensorsOut` whose tensors the caller
writes in place (returned params are copied once, straight into the response body). BF16 output
(params on request, half the bytes) is rounded to nearest-even like torch's float32 -> bfloat16
cast and written with a header of our own: the package's numpy API has no bfloat16, and its raw
`serialize` API changed in 0.8.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping
from typing import Any, Final

import numpy as np
import orjson
from safetensors.numpy import save

from .errors import WireError, invalid_body
from .media import JSON
from .message import BF16, F16, F32, Message, as_float32, check_shape

METADATA_KEY: Final = "__metadata__"
MAX_HEADER_BYTES: Final = 100_000_000  # the safetensors crate refuses larger headers too
_LENGTH_BYTES: Final = 8
_HEADER_ALIGN: Final = 8  # the package pads its header with spaces to this, so data is aligned
#: header bytes SafetensorsOut reserves for the fields (a push's are well under 300)
METADATA_ROOM: Final = 1024
#: safetensors dtype -> its little-endian storage type. BF16 is read as raw 16-bit words.
_STORAGE: Final = {F32: np.dtype("<f4"), F16: np.dtype("<f2"), BF16: np.dtype("<u2")}
FLOAT32_ONLY: Final = frozenset({F32})
HALF_OR_FLOAT32: Final = frozenset({F32, F16, BF16})


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


def _layout(name: str, info: object, upcast: bool) -> tuple[int, int, list[int], str]:
    """(begin, end, shape, dtype) of one header entry, checked against its dtype and shape."""
    where = f"safetensors tensor {name!r}"
    if not isinstance(info, dict):
        raise invalid_body(f"{where}: header entry must be an object")
    dtype = info.get("dtype")
    if not isinstance(dtype, str) or dtype not in (HALF_OR_FLOAT32 if upcast else FLOAT32_ONLY):
        accepted = "F32, F16 or BF16 (upcast to float32)" if upcast else "only F32 (float32)"
        raise invalid_body(f"{where} has dtype {dtype!r}; this body takes {accepted}")
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
    nbytes = math.prod(shape) * _STORAGE[dtype].itemsize
    if end - begin != nbytes:
        raise invalid_body(
            f"{where}: shape {shape} of {dtype} needs {nbytes} bytes, offsets give {end - begin}"
        )
    return begin, end, shape, dtype


def _to_float32(
    body: bytes | bytearray | memoryview, offset: int, count: int, shape: list[int], dtype: str
) -> np.ndarray:
    """One tensor of the body as an aligned, writable, C-contiguous native float32 array.

    A writable body (the API reads large bodies into a buffer of their own) holding aligned
    native F32 is viewed in place: no copy, and the body lives exactly as long as its tensors.
    Otherwise np.frombuffer views the body (read-only, maybe unaligned) and the one astype per
    tensor allocates the result, byte-swapping in the same pass on a big-endian host. Both
    upcasts are exact.
    """
    view = np.frombuffer(body, dtype=_STORAGE[dtype], count=count, offset=offset).reshape(shape)
    if dtype == F32 and view.flags.writeable and view.flags.aligned and np.little_endian:
        return view
    if dtype != BF16:
        return view.astype(np.float32)  # F32: a copy; F16: IEEE half -> single, exact
    # BF16 is the top half of a float32: widen the words, shift them up, reinterpret the bits.
    words = view.astype(np.uint32)
    words <<= 16
    return words.view(np.float32)


def decode_safetensors_message(
    body: bytes | bytearray | memoryview, upcast: bool = False
) -> Message:
    """A safetensors body -> Message with writable float32 arrays and JSON-decoded fields.

    F32 tensors only, unless `upcast`: then F16 and BF16 tensors too, widened exactly to float32.
    """
    header_len, header = _read_header(body)
    fields = _decode_metadata(header.pop(METADATA_KEY, None))
    layout = {name: _layout(name, info, upcast) for name, info in header.items()}

    # Byte ranges must tile the data section: no gap, no overlap, nothing after the last tensor.
    data_len = len(body) - _LENGTH_BYTES - header_len
    cursor = 0
    for name, (begin, end, _, _) in sorted(layout.items(), key=lambda item: item[1][:2]):
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
    for name, (begin, end, shape, dtype) in layout.items():
        count = (end - begin) // _STORAGE[dtype].itemsize
        tensors[name] = _to_float32(body, start + begin, count, shape, dtype)
    return Message(tensors=tensors, fields=fields)


def float32_to_bf16_bits(array: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (little-endian uint16, C order), rounded to nearest even.

    The same rounding as torch's cast: add 0x7FFF plus the lowest kept bit, then drop the low
    16 bits; values past the largest bfloat16 round to infinity, subnormals round like any value.
    NaN stays NaN: sign and top payload bits kept, quiet bit set (plain truncation could turn a
    NaN whose payload sits in the low bits into infinity). torch's own NaN bits are no reference:
    its CPU kernels write 0xFFFF for every NaN, its scalar c10 code 0x7FC0.
    """
    values = array.astype(np.float32, order="C", copy=False).reshape(-1)  # 1-d: no numpy scalars
    bits = values.view(np.uint32)
    rounded = bits >> 16
    rounded &= 1
    rounded += 0x7FFF
    rounded += bits  # wraps only for NaNs with a high payload, replaced below
    rounded >>= 16
    nan = np.isnan(values)
    if nan.any():
        rounded[nan] = (bits[nan] >> 16) | 0x0040
    return rounded.astype("<u2").reshape(array.shape)


def _metadata(fields: Mapping[str, Any]) -> dict[str, str]:
    return {
        key: orjson.dumps(value, option=orjson.OPT_SERIALIZE_NUMPY).decode()
        for key, value in fields.items()
    }


def _save_bf16(arrays: Mapping[str, np.ndarray], metadata: dict[str, str]) -> bytes:
    """A safetensors file of BF16 tensors, laid out as the package writes one: `__metadata__`
    first, tensors back to back in name order, the header padded with spaces to 8 bytes."""
    header: dict[str, Any] = {METADATA_KEY: metadata} if metadata else {}
    words: list[np.ndarray] = []
    offset = 0
    for name in sorted(arrays):
        data = float32_to_bf16_bits(arrays[name])
        end = offset + data.nbytes
        header[name] = {
            "dtype": BF16,
            "shape": list(arrays[name].shape),
            "data_offsets": [offset, end],
        }
        offset = end
        words.append(data.reshape(-1))  # 1-d so that the buffer is plain bytes even for 0-d
    text = orjson.dumps(header)
    text += b" " * (-len(text) % _HEADER_ALIGN)
    return b"".join([struct.pack("<Q", len(text)), text, *(memoryview(w).cast("B") for w in words)])


def encode_safetensors_message(
    tensors: Mapping[str, np.ndarray], fields: Mapping[str, Any], dtype: str = F32
) -> bytes:
    """Message parts -> safetensors bytes; each field is stored as its JSON text.

    `dtype` F32 writes the float32 values exactly; BF16 rounds them (half the bytes).
    """
    if dtype not in (F32, BF16):
        raise ValueError(f"cannot encode safetensors dtype {dtype!r}")
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
    if dtype == BF16:
        return _save_bf16(arrays, _metadata(fields))
    return save(arrays, metadata=_metadata(fields) or None)


class SafetensorsOut:
    """A float32 safetensors body allocated before its tensors exist, written in place.

    The engine copies the params it returns under the session's lock anyway; copying them into
    the data section of the response body instead saves the encoder's copies of a large tensor.
    The header is written last, into room reserved ahead of the data and padded with spaces (as
    the package pads its own headers, so any safetensors reader takes it); fields that do not
    fit make `finish` decline, and the caller encodes the usual way.
    """

    def __init__(self, metadata_room: int = METADATA_ROOM) -> None:
        self.metadata_room = metadata_room
        self.body: memoryview | None = None
        self.room = 0  # header bytes ahead of the data
        self.arrays: dict[str, np.ndarray] = {}
        self.entries: dict[str, dict[str, Any]] = {}

    def allocate(self, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
        """Writable float32 arrays of these shapes inside a new body (a previous one is
        dropped: an engine that runs a batch again allocates again)."""
        entries: dict[str, dict[str, Any]] = {}
        offset = 0
        for name in sorted(shapes):
            end = offset + math.prod(shapes[name]) * _STORAGE[F32].itemsize
            shape = list(shapes[name])
            entries[name] = {"dtype": F32, "shape": shape, "data_offsets": [offset, end]}
            offset = end
        room = len(orjson.dumps(entries)) + self.metadata_room
        room += -room % _HEADER_ALIGN  # the data starts 8-aligned, as the package lays it out
        start = _LENGTH_BYTES + room
        # not zero-filled: the caller writes every array, finish() the header
        self.body = body = memoryview(np.empty(start + offset, np.uint8))
        body[:_LENGTH_BYTES] = struct.pack("<Q", room)
        self.room, self.entries = room, entries
        self.arrays = {
            name: np.frombuffer(
                body, np.float32, math.prod(shapes[name]), start + entry["data_offsets"][0]
            ).reshape(shapes[name])
            for name, entry in entries.items()
        }
        return dict(self.arrays)

    def finish(
        self, tensors: Mapping[str, np.ndarray], fields: Mapping[str, Any]
    ) -> memoryview | None:
        """The body with its header written; None when `tensors` are not this body's arrays
        (the engine returned others) or the fields do not fit the room reserved for them."""
        if self.body is None or tensors.keys() != self.arrays.keys():
            return None
        if any(tensors[name] is not array for name, array in self.arrays.items()):
            return None
        metadata = _metadata(fields)
        header = {METADATA_KEY: metadata, **self.entries} if metadata else self.entries
        text = orjson.dumps(header)
        if len(text) > self.room:
            return None
        self.body[_LENGTH_BYTES : _LENGTH_BYTES + self.room] = text.ljust(self.room)
        return self.body
