"""The shape every algorithm has (optax-style `init`/`update` pairs) and the registry of them."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import HyperparameterError
from .hyperparams import Hyperparameter, validate

#: One tensor's optimizer state with torch's names: arrays shaped like the parameter (float32) and
#: 0-dim scalars (`step`, `mu_product`) held as np.float32, like torch's 0-dim float32 tensors.
TensorState = dict[str, Any]
#: State entries that are 0-dim float32 scalars in torch; the others are shaped like the param.
SCALAR_STATE = frozenset({"step", "mu_product"})
Hyperparameters = Mapping[str, Any]

InitFn = Callable[[np.ndarray, Hyperparameters], TensorState]
# update(param, grad, state, hyperparameters, lr): steps one tensor in place. In place because the
# caller owns fresh copies (decoded from the store) and a copy per step would double memory traffic.
UpdateFn = Callable[[np.ndarray, np.ndarray, TensorState, Hyperparameters, float], None]


@dataclass(frozen=True)
class Algorithm:
    """A named optimizer: hyperparameter spec, state initialiser and one-tensor update."""

    name: str
    spec: tuple[Hyperparameter, ...]
    init: InitFn
    update: UpdateFn
    #: Adagrad creates state for every tensor at construction; the others on the first gradient.
    eager_state: bool = False
    check: Callable[[dict[str, Any]], None] | None = field(default=None, repr=False)

    def configure(self, options: Mapping[str, Any]) -> dict[str, Any]:
        """Validated hyperparameters with torch's defaults filled in."""
        return validate(self.name, self.spec, options, self.check)

    @property
    def defaults(self) -> dict[str, Any]:
        return {h.name: h.default for h in self.spec}


_REGISTRY: dict[str, Algorithm] = {}


def register(algorithm: Algorithm) -> Algorithm:
    """Add an algorithm under its torch name (lower case)."""
    _REGISTRY[algorithm.name] = algorithm
    return algorithm


def get_algorithm(name: Any) -> Algorithm:
    """The algorithm registered as `name`, or HyperparameterError with code `unknown_optimizer`."""
    if isinstance(name, str) and name.lower() in _REGISTRY:
        return _REGISTRY[name.lower()]
    raise HyperparameterError(
        "name", name, "one of " + ", ".join(sorted(_REGISTRY)), code="unknown_optimizer"
    )


def algorithm_names() -> list[str]:
    return sorted(_REGISTRY)


def zeros_like(param: np.ndarray) -> np.ndarray:
    """A float32 zero array of the parameter's shape (state buffers start here)."""
    return np.zeros(param.shape, dtype=np.float32)
