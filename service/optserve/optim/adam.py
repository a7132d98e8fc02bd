"""Adam, AMSGrad and AdamW: torch `_single_tensor_adam` (OPTIMIZERS 3.2, 3.3)."""

from __future__ import annotations

import numpy as np
from numba import njit

from .base import Algorithm, Hyperparameters, TensorState, register, zeros_like
from .hyperparams import NON_NEGATIVE, UNIT_INTERVAL, Flag, Hyperparameter, Pair
from .kernels import (
    F32,
    KERNEL,
    adam_moments,
    addcdiv,
    flat,
    increment_step,
    launch,
    maximum,
    moment_scalars,
)


@njit(**KERNEL)
def _kernel(
    p,
    g,
    m,
    v,
    vmax,
    moments,
    amsgrad,
    bias_correction2_sqrt,
    eps,
    neg_step_size,
):
    for i in range(p.shape[0]):
        param, _, mi, vi = adam_moments(i, p, g, m, v, moments)
        if amsgrad:
            vi = maximum(vmax[i], vi)  # the max of the raw v, bias-corrected afterwards
            vmax[i] = vi
        denom = F32(F32(np.sqrt(vi)) / bias_correction2_sqrt) + eps
        p[i] = addcdiv(param, mi, denom, neg_step_size)


def init(param: np.ndarray, hp: Hyperparameters) -> TensorState:
    state: TensorState = {
        "step": F32(0),
        "exp_avg": zeros_like(param),
        "exp_avg_sq": zeros_like(param),
    }
    if hp["amsgrad"]:
        state["max_exp_avg_sq"] = zeros_like(param)
    return state


def step_adam(
    param: np.ndarray,
    grad: np.ndarray,
    state: TensorState,
    hp: Hyperparameters,
    lr: float,
    decoupled: bool,
) -> None:
    """One Adam step of one tensor; `decoupled` selects AdamW's multiplicative decay."""
    beta1, beta2 = hp["betas"]
    step = increment_step(state["step"])
    state["step"] = step
    t = float(step)
    # Scalars in float64 as torch computes them; each becomes float32 only at its kernel.
    step_size = lr / (1 - beta1**t)
    bias_correction2_sqrt = (1 - beta2**t) ** 0.5
    launch(
        _kernel,
        (
            param.reshape(-1),
            grad.reshape(-1),
            flat(state["exp_avg"]),
            flat(state["exp_avg_sq"]),
            flat(state.get("max_exp_avg_sq")),
        ),
        moment_scalars(hp, lr, decoupled),
        hp["amsgrad"],
        F32(bias_correction2_sqrt),
        F32(hp["eps"]),
        F32(-step_size),
    )


def update(
    param: np.ndarray, grad: np.ndarray, state: TensorState, hp: Hyperparameters, lr: float
) -> None:
    step_adam(param, grad, state, hp, lr, decoupled=hp["decoupled_weight_decay"])


def update_adamw(
    param: np.ndarray, grad: np.ndarray, state: TensorState, hp: Hyperparameters, lr: float
) -> None:
    step_adam(param, grad, state, hp, lr, decoupled=True)


def adam_family_spec(lr: float, weight_decay: float = 0.0) -> tuple[Hyperparameter, ...]:
    """lr, betas, eps and weight_decay as torch's Adam-family constructors declare them."""
    return (
        Hyperparameter("lr", lr, NON_NEGATIVE),
        Hyperparameter("betas", (0.9, 0.999), Pair(UNIT_INTERVAL)),
        Hyperparameter("eps", 1e-8, NON_NEGATIVE),
        Hyperparameter("weight_decay", weight_decay, NON_NEGATIVE),
    )


ADAM = register(
    Algorithm(
        name="adam",
        spec=(
            *adam_family_spec(lr=1e-3),
            Hyperparameter("amsgrad", False, Flag()),
            Hyperparameter("maximize", False, Flag()),
            Hyperparameter("decoupled_weight_decay", False, Flag()),
        ),
        init=init,
        update=update,
    )
)

ADAMW = register(
    Algorithm(
        name="adamw",
        spec=(
            *adam_family_spec(lr=1e-3, weight_decay=1e-2),
            Hyperparameter("amsgrad", False, Flag()),
            Hyperparameter("maximize", False, Flag()),
        ),
        init=init,
        update=update_adamw,
    )
)
