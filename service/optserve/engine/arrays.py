"""numpy arrays <-> the raw little-endian float32 bytes the store keeps (no pickle, no JSON)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from ..optim import SCALAR_STATE, TensorState

LE_F32 = np.dtype("<f4")


def to_bytes(array: np.ndarray | np.floating) -> bytes:
    """Raw little-endian float32 bytes of an array or a 0-dim scalar."""
    return np.ascontiguousarray(array, dtype=LE_F32).tobytes()


def array_from_bytes(data: bytes, shape: tuple[int, ...]) -> np.ndarray:
    """A writable native float32 array: the one copy out of the immutable bytes Redis returned."""
    array = np.frombuffer(data, dtype=LE_F32)
    if array.size != int(np.prod(shape, dtype=np.int64)):
        raise ValueError(f"stored array has {array.size} elements, expected shape {shape}")
    return array.astype(np.float32, copy=True).reshape(shape)


def state_to_fields(state: TensorState) -> dict[str, bytes]:
    return {name: to_bytes(value) for name, value in state.items()}


def state_from_fields(fields: Mapping[str, bytes], shape: tuple[int, ...]) -> TensorState:
    """Scalars (`step`, `mu_product`) come back as np.float32, arrays shaped like the param."""
    state: TensorState = {}
    for name, data in fields.items():
        if name in SCALAR_STATE:
            state[name] = np.frombuffer(data, dtype=LE_F32)[0].astype(np.float32)
        else:
            state[name] = array_from_bytes(data, shape)
    return state
