"""RMSprop, plain or centered, with momentum: torch `_single_tensor_rmsprop` (OPTIMIZERS 3.4).

No bias correction and `square_avg` starts at zero, so the first step is about 10*lr per element
for alpha=0.99; that is torch's behaviour and users comparing runs expect it.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from .base import Algorithm, Hyperparameters, TensorState, register, zeros_like
from .hyperparams import NON_NEGATIVE, Flag, Hyperparameter
from .kernels import (
    F32,
    KERNEL,
    addcdiv,
    addcmul,
    flat,
    fma,
    grad_term,
    increment_step,
    launch,
    lerp,
)


@njit(**KERNEL)
def _kernel(
    p,
    g,
    sq,
    ga,
    buf,
    maximize,
    l2,
    wd,
    alpha,
    one_minus_alpha,
    centered,
    eps,
    use_momentum,
    momentum,
    neg_lr,
):
    for i in range(p.shape[0]):
        d = grad_term(g[i], p[i], maximize, l2, wd)
        s = addcmul(F32(sq[i] * alpha), d, d, one_minus_alpha)
        sq[i] = s
        if centered:
            a = lerp(ga[i], d, one_minus_alpha)
            ga[i] = a
            s = addcmul(s, a, a, F32(-1.0))  # may round below zero -> NaN, exactly as torch
        avg = F32(np.sqrt(s)) + eps
        if use_momentum:
            b = addcdiv(F32(buf[i] * momentum), d, avg, F32(1.0))
            buf[i] = b
            p[i] = fma(b, neg_lr, p[i])
        else:
            p[i] = addcdiv(p[i], d, avg, neg_lr)


def init(param: np.ndarray, hp: Hyperparameters) -> TensorState:
    state: TensorState = {"step": F32(0), "square_avg": zeros_like(param)}
    if hp["momentum"] > 0:
        state["momentum_buffer"] = zeros_like(param)
    if hp["centered"]:
        state["grad_avg"] = zeros_like(param)
    return state


def update(
    param: np.ndarray, grad: np.ndarray, state: TensorState, hp: Hyperparameters, lr: float
) -> None:
    alpha, wd = hp["alpha"], hp["weight_decay"]
    state["step"] = increment_step(state["step"])  # kept for torch's state_dict; unused by the math
    launch(
        _kernel,
        (
            param.reshape(-1),
            grad.reshape(-1),
            flat(state["square_avg"]),
            flat(state.get("grad_avg")),
            flat(state.get("momentum_buffer")),
        ),
        hp["maximize"],
        wd != 0,
        F32(wd),
        F32(alpha),
        F32(1 - alpha),
        hp["centered"],
        F32(hp["eps"]),
        hp["momentum"] > 0,
        F32(hp["momentum"]),
        F32(-lr),
    )


RMSPROP = register(
    Algorithm(
        name="rmsprop",
        spec=(
            Hyperparameter("lr", 1e-2, NON_NEGATIVE),
            Hyperparameter("alpha", 0.99, NON_NEGATIVE),
            Hyperparameter("eps", 1e-8, NON_NEGATIVE),
            Hyperparameter("weight_decay", 0.0, NON_NEGATIVE),
            Hyperparameter("momentum", 0.0, NON_NEGATIVE),
            Hyperparameter("centered", False, Flag()),
            Hyperparameter("maximize", False, Flag()),
        ),
        init=init,
        update=update,
    )
)
