"""numpy arrays <-> the raw little-endian float32 bytes the store keeps (no pickle, no JSON).

Writes hand the store a zero-copy view of each array's memory (the store slices it into
chunks); reads copy the stored chunks once, straight into the array they become.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np

from ..optim import SCALAR_STATE, TensorState

LE_F32 = np.dtype("<f4")

#: What the store returns for one array: its chunks in order (or one bytes object).
Stored = bytes | Sequence[bytes]
#: Where returned arrays are copied to: given their shapes, writable float32 arrays (the API's
#: response body, so the one copy made under the session's lock is also the encoding).
ParamsOut = Callable[[Mapping[str, tuple[int, ...]]], dict[str, np.ndarray]]


def to_bytes(array: np.ndarray | np.floating) -> memoryview:
    """A zero-copy byte view of a little-endian float32 array (copied only if it is not one).

    The caller must not change the array until the write that uses the view has returned.
    """
    contiguous = np.ascontiguousarray(array, dtype=LE_F32)
    if contiguous.ndim == 0:
        contiguous = contiguous.reshape(1)
    return memoryview(contiguous).cast("B")


def array_from_bytes(
    data: Stored, shape: tuple[int, ...], into: np.ndarray | None = None
) -> np.ndarray:
    """A writable native float32 array, filled from the stored chunks with one copy (into
    `into`, a C-contiguous float32 array of that shape, when given: it is what comes back)."""
    parts = [data] if isinstance(data, bytes | bytearray | memoryview) else list(data)
    size = int(np.prod(shape, dtype=np.int64))
    if sum(len(part) for part in parts) != size * LE_F32.itemsize:
        stored = sum(len(part) for part in parts) // LE_F32.itemsize
        raise ValueError(f"stored array has {stored} elements, expected shape {shape}")
    array = np.empty(size, dtype=np.float32) if into is None else into.reshape(-1)
    offset = 0
    for part in parts:
        chunk = np.frombuffer(part, dtype=LE_F32)
        array[offset : offset + chunk.size] = chunk
        offset += chunk.size
    return array.reshape(shape) if into is None else into


def copies(
    arrays: Mapping[str, np.ndarray], names: Iterable[str], out: ParamsOut | None = None
) -> dict[str, np.ndarray]:
    """Copies of the named arrays: new ones, or written into what `out` allocates for them (a
    response body, so that the one copy made is also the encoding)."""
    if out is None:
        return {name: arrays[name].copy() for name in names}
    names = list(names)
    copied = out({name: arrays[name].shape for name in names})
    for name in names:
        np.copyto(copied[name], arrays[name])
    return copied


def state_to_fields(state: TensorState) -> dict[str, memoryview]:
    return {name: to_bytes(value) for name, value in state.items()}


def state_from_fields(fields: Mapping[str, Stored], shape: tuple[int, ...]) -> TensorState:
    """Scalars (`step`, `mu_product`) come back as np.float32, arrays shaped like the param."""
    state: TensorState = {}
    for name, data in fields.items():
        if name in SCALAR_STATE:
            state[name] = array_from_bytes(data, ())[()].astype(np.float32)
        else:
            state[name] = array_from_bytes(data, shape)
    return state
