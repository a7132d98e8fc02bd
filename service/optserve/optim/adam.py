"""Adam, AMSGrad and AdamW: torch `_single_tensor_adam` (OPTIMIZERS 3.2, 3.3)."""

from __future__ import annotations

import numpy as np
from numba import njit

from .base import Algorithm, Hyperparameters, TensorState, register, zeros_like
from .hyperparams import NON_NEGATIVE, UNIT_INTERVAL, Flag, Hyperparameter, Pair
from .kernels import (
    F32,
    KERNEL,
    addcdiv,
    addcmul,
    flat,
    grad_term,
    increment_step,
    launch,
    lerp,
    maximum,
)


@njit(**KERNEL)
def _kernel(
    p,
    g,
    m,
    v,
    vmax,
    maximize,
    l2,
    wd,
    decoupled,
    decay,
    one_minus_beta1,
    beta2,
    one_minus_beta2,
    amsgrad,
    bias_correction2_sqrt,
    eps,
    neg_step_size,
):
    for i in range(p.shape[0]):
        param = F32(p[i] * decay) if decoupled else p[i]
        d = grad_term(g[i], param, maximize, l2, wd)
        mi = lerp(m[i], d, one_minus_beta1)
        m[i] = mi
        vi = addcmul(F32(v[i] * beta2), d, d, one_minus_beta2)
        v[i] = vi
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
    wd = hp["weight_decay"]
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
        hp["maximize"],
        wd != 0 and not decoupled,
        F32(wd),
        wd != 0 and decoupled,
        F32(1 - lr * wd),
        F32(1 - beta1),
        F32(beta2),
        F32(1 - beta2),
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


_COMMON = (
    Hyperparameter("lr", 1e-3, NON_NEGATIVE),
    Hyperparameter("betas", (0.9, 0.999), Pair(UNIT_INTERVAL)),
    Hyperparameter("eps", 1e-8, NON_NEGATIVE),
)

ADAM = register(
    Algorithm(
        name="adam",
        spec=(
            *_COMMON,
            Hyperparameter("weight_decay", 0.0, NON_NEGATIVE),
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
            *_COMMON,
            Hyperparameter("weight_decay", 1e-2, NON_NEGATIVE),
            Hyperparameter("amsgrad", False, Flag()),
            Hyperparameter("maximize", False, Flag()),
        ),
        init=init,
        update=update_adamw,
    )
)
