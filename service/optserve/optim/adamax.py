"""Adamax (infinity-norm Adam): torch `_single_tensor_adamax` (OPTIMIZERS 3.9)."""

from __future__ import annotations

import numpy as np
from numba import njit

from .base import Algorithm, Hyperparameters, TensorState, register, zeros_like
from .hyperparams import NON_NEGATIVE, UNIT_INTERVAL, Flag, Hyperparameter, Pair
from .kernels import F32, KERNEL, addcdiv, grad_term, increment_step, launch, lerp, maximum


@njit(**KERNEL)
def _kernel(p, g, m, u, maximize, l2, wd, one_minus_beta1, beta2, eps, neg_clr):
    for i in range(p.shape[0]):
        d = grad_term(g[i], p[i], maximize, l2, wd)
        mi = lerp(m[i], d, one_minus_beta1)
        m[i] = mi
        ui = maximum(F32(u[i] * beta2), F32(abs(d) + eps))
        u[i] = ui
        p[i] = addcdiv(p[i], mi, ui, neg_clr)


def init(param: np.ndarray, hp: Hyperparameters) -> TensorState:
    return {"step": F32(0), "exp_avg": zeros_like(param), "exp_inf": zeros_like(param)}


def update(
    param: np.ndarray, grad: np.ndarray, state: TensorState, hp: Hyperparameters, lr: float
) -> None:
    beta1, beta2 = hp["betas"]
    step = increment_step(state["step"])
    state["step"] = step
    clr = lr / (1 - beta1 ** float(step))
    wd = hp["weight_decay"]
    launch(
        _kernel,
        (
            param.reshape(-1),
            grad.reshape(-1),
            state["exp_avg"].reshape(-1),
            state["exp_inf"].reshape(-1),
        ),
        hp["maximize"],
        wd != 0,
        F32(wd),
        F32(1 - beta1),
        F32(beta2),
        F32(hp["eps"]),
        F32(-clr),
    )


ADAMAX = register(
    Algorithm(
        name="adamax",
        spec=(
            Hyperparameter("lr", 2e-3, NON_NEGATIVE),
            Hyperparameter("betas", (0.9, 0.999), Pair(UNIT_INTERVAL)),
            Hyperparameter("eps", 1e-8, NON_NEGATIVE),
            Hyperparameter("weight_decay", 0.0, NON_NEGATIVE),
            Hyperparameter("maximize", False, Flag()),
        ),
        init=init,
        update=update,
    )
)
