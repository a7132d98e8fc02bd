"""One optimizer update over a model's named tensors, with torch's `optimizer.step()` semantics.

A tensor with no gradient in the update is skipped entirely (no step, no decay, no state change);
a zero gradient is a real step. Everything that can reject an update is checked before any array
is written, so a rejected update leaves params and state exactly as they were.
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass

import numpy as np

from .base import Algorithm, Hyperparameters, TensorState
from .clipping import clip_grad_norm
from .errors import GradientError, NonFiniteGradientError
from .kernels import is_finite


@dataclass(frozen=True)
class UpdateResult:
    """What an update did: the tensors it stepped and the pre-clip global norm, if clipping ran."""

    stepped: tuple[str, ...]
    total_norm: float | None = None


def initial_states(
    algorithm: Algorithm, hp: Hyperparameters, params: Mapping[str, np.ndarray]
) -> dict[str, TensorState]:
    """State that exists before any step: only eager algorithms (Adagrad) have some."""
    if not algorithm.eager_state:
        return {}
    return {name: algorithm.init(param, hp) for name, param in params.items()}


def check_gradients(
    shapes: Mapping[str, tuple[int, ...]], grads: Mapping[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """Gradients as C-contiguous float32 arrays, or GradientError naming the first bad tensor."""
    checked: dict[str, np.ndarray] = {}
    for name, grad in grads.items():
        shape = shapes.get(name)
        if shape is None:
            raise GradientError("unknown_tensor", name, "the session has no tensor of that name")
        grad = np.asarray(grad)
        if grad.shape != tuple(shape):
            raise GradientError(
                "shape_mismatch", name, f"shape {list(grad.shape)}, expected {list(shape)}"
            )
        # np.require keeps 0-d arrays 0-d (ascontiguousarray would make them 1-d).
        checked[name] = np.require(grad, dtype=np.float32, requirements="C")
    return checked


def find_non_finite(grads: Mapping[str, np.ndarray]) -> list[str]:
    """Names of gradients holding NaN or infinity."""
    return [name for name, grad in grads.items() if not is_finite(grad)]


def apply_update(
    algorithm: Algorithm,
    hp: Hyperparameters,
    params: Mapping[str, np.ndarray],
    grads: Mapping[str, np.ndarray],
    states: MutableMapping[str, TensorState],
    lr: float,
    *,
    max_norm: float | None = None,
    norm_type: float = 2.0,
) -> UpdateResult:
    """Step every tensor that has a gradient, in place, in the order of `params`.

    `params` and `states` are modified in place (the caller owns copies loaded for this update);
    the gradients are consumed too: clipping scales them in place, as `clip_grad_norm_` does.
    """
    checked = check_gradients({name: p.shape for name, p in params.items()}, grads)
    # Parameter order, as `model.parameters()`: the clip norm's float32 sum depends on it.
    grads = {name: checked[name] for name in params if name in checked}
    bad = find_non_finite(grads)
    if bad:
        raise NonFiniteGradientError(bad)
    total_norm = clip_grad_norm(grads, max_norm, norm_type) if max_norm is not None else None
    stepped = []
    for name, param in params.items():
        grad = grads.get(name)
        if grad is None:
            continue
        state = states.get(name)
        if state is None:
            state = states[name] = algorithm.init(param, hp)
        algorithm.update(param, grad, state, hp, lr)
        stepped.append(name)
    return UpdateResult(stepped=tuple(stepped), total_norm=total_norm)
