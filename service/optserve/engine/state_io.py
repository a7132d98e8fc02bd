"""Checks for importing an optimizer state: what a valid state of each tensor looks like."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from ..optim import SCALAR_STATE, Algorithm, TensorState
from .errors import EngineError


def stepped_layout(algorithm: Algorithm, hp: Mapping[str, Any]) -> frozenset[str]:
    """The state names a tensor has once it has been stepped: probed with one zero step rather
    than listed, so a new algorithm needs no entry here."""
    probe = np.zeros(1, dtype=np.float32)
    state = algorithm.init(probe, hp)
    algorithm.update(probe, np.zeros(1, dtype=np.float32), state, hp, 0.0)
    return frozenset(state)


def check_tensor_state(
    name: str,
    state: Mapping[str, Any],
    shape: tuple[int, ...],
    layout: frozenset[str],
) -> TensorState:
    """One tensor's imported state as arrays and float32 scalars, or EngineError naming it.

    Valid: no state at all (never stepped; eager algorithms re-create theirs on the next push)
    or exactly the stepped layout.
    """
    keys = frozenset(state)
    allowed = {frozenset(), layout}
    if keys not in allowed:
        expected = " or ".join(sorted(str(sorted(a)) for a in allowed))
        raise EngineError(
            "invalid_state", f"tensor {name!r} has state {sorted(keys)}, expected {expected}"
        )
    checked: TensorState = {}
    for key, value in state.items():
        if key in SCALAR_STATE:
            if (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or not math.isfinite(value)
            ):
                raise EngineError("invalid_state", f"tensor {name!r}: {key} must be a number")
            checked[key] = np.float32(value)
        else:
            array = np.asarray(value)
            if array.shape != shape:
                raise EngineError(
                    "shape_mismatch",
                    f"tensor {name!r}: {key} has shape {list(array.shape)}, expected {list(shape)}",
                    tensor=name,
                )
            checked[key] = np.require(array, dtype=np.float32, requirements="C")
    return checked
