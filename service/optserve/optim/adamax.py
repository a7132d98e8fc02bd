"""Adamax (infinity-norm Adam): torch `_single_tensor_adamax` (OPTIMIZERS 3.9)."""

from __future__ import annotations

import numpy as np

from ._grad import effective_grad
from .base import Algorithm, Hyperparameters, TensorState, register, zeros_like
from .hyperparams import NON_NEGATIVE, UNIT_INTERVAL, Flag, Hyperparameter, Pair
from .kernels import F32, addcdiv_, blocks, increment_step, lerp_, temp


def init(param: np.ndarray, hp: Hyperparameters) -> TensorState:
    return {"step": F32(0), "exp_avg": zeros_like(param), "exp_inf": zeros_like(param)}


def update(
    param: np.ndarray, grad: np.ndarray, state: TensorState, hp: Hyperparameters, lr: float
) -> None:
    beta1, beta2 = hp["betas"]
    step = increment_step(state["step"])
    state["step"] = step
    clr = lr / (1 - beta1 ** float(step))
    p_flat, g_flat = param.reshape(-1), grad.reshape(-1)
    m_flat, u_flat = state["exp_avg"].reshape(-1), state["exp_inf"].reshape(-1)
    for block in blocks(p_flat.shape[0]):
        p = p_flat[block]
        g = effective_grad(p, g_flat[block], hp["maximize"], hp["weight_decay"])
        m, u = m_flat[block], u_flat[block]
        lerp_(m, g, 1 - beta1)
        u *= F32(beta2)
        bound = temp(p.shape[0], 1)
        np.abs(g, out=bound)
        bound += F32(hp["eps"])
        np.maximum(u, bound, out=u)
        addcdiv_(p, m, u, -clr)


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
