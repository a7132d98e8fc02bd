"""RAdam (rectified Adam): torch `_single_tensor_radam` (OPTIMIZERS 3.8)."""

from __future__ import annotations

import numpy as np

from ._grad import effective_grad
from .base import Algorithm, Hyperparameters, TensorState, register, zeros_like
from .hyperparams import NON_NEGATIVE, UNIT_INTERVAL, Flag, Hyperparameter, Pair
from .kernels import F32, add_, addcmul_, blocks, increment_step, lerp_, temp


def init(param: np.ndarray, hp: Hyperparameters) -> TensorState:
    return {"step": F32(0), "exp_avg": zeros_like(param), "exp_avg_sq": zeros_like(param)}


def update(
    param: np.ndarray, grad: np.ndarray, state: TensorState, hp: Hyperparameters, lr: float
) -> None:
    beta1, beta2 = hp["betas"]
    weight_decay, decoupled = hp["weight_decay"], hp["decoupled_weight_decay"]
    step = increment_step(state["step"])
    state["step"] = step
    t = float(step)
    bias_correction1 = 1 - beta1**t
    bias_correction2 = 1 - beta2**t
    rho_inf = 2 / (1 - beta2) - 1
    rho_t = rho_inf - 2 * t * (beta2**t) / bias_correction2
    rectified = rho_t > 5.0
    if rectified:
        rect = (
            (rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t)
        ) ** 0.5
    p_flat, g_flat = param.reshape(-1), grad.reshape(-1)
    m_flat, v_flat = state["exp_avg"].reshape(-1), state["exp_avg_sq"].reshape(-1)
    for block in blocks(p_flat.shape[0]):
        p = p_flat[block]
        if decoupled and weight_decay != 0:
            p *= F32(1 - lr * weight_decay)
        g = effective_grad(p, g_flat[block], hp["maximize"], 0.0 if decoupled else weight_decay)
        m, v = m_flat[block], v_flat[block]
        lerp_(m, g, 1 - beta1)
        v *= F32(beta2)
        addcmul_(v, g, g, 1 - beta2)
        upd = temp(p.shape[0], 1)
        np.divide(m, F32(bias_correction1), out=upd)  # bias-corrected exp_avg
        upd *= F32(lr)
        if rectified:
            # (sqrt(bc2) / (sqrt(v) + eps)) is torch's __rdiv__: reciprocal, then scale.
            adaptive = temp(p.shape[0], 2)
            np.sqrt(v, out=adaptive)
            adaptive += F32(hp["eps"])
            np.reciprocal(adaptive, out=adaptive)
            adaptive *= F32(bias_correction2**0.5)
            upd *= adaptive
            upd *= F32(rect)
        add_(p, upd, -1.0)


RADAM = register(
    Algorithm(
        name="radam",
        spec=(
            Hyperparameter("lr", 1e-3, NON_NEGATIVE),
            Hyperparameter("betas", (0.9, 0.999), Pair(UNIT_INTERVAL)),
            Hyperparameter("eps", 1e-8, NON_NEGATIVE),
            Hyperparameter("weight_decay", 0.0, NON_NEGATIVE),
            Hyperparameter("decoupled_weight_decay", False, Flag()),
            Hyperparameter("maximize", False, Flag()),
        ),
        init=init,
        update=update,
    )
)
