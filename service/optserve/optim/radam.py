"""RAdam (rectified Adam): torch `_single_tensor_radam` (OPTIMIZERS 3.8)."""

from __future__ import annotations

import numpy as np
from numba import njit

from .adam import adam_family_spec
from .base import Algorithm, Hyperparameters, TensorState, register, zeros_like
from .hyperparams import Flag, Hyperparameter
from .kernels import F32, KERNEL, adam_moments, fma, increment_step, launch, moment_scalars


@njit(**KERNEL)
def _kernel(
    p,
    g,
    m,
    v,
    moments,
    bias_correction1,
    lr,
    rectified,
    eps,
    bias_correction2_sqrt,
    rect,
):
    for i in range(p.shape[0]):
        param, _, mi, vi = adam_moments(i, p, g, m, v, moments)
        step = F32(F32(mi / bias_correction1) * lr)
        if rectified:
            # sqrt(bc2) / (sqrt(v) + eps) is torch's __rdiv__: a reciprocal, then a scale.
            adaptive = F32(F32(F32(1.0) / F32(F32(np.sqrt(vi)) + eps)) * bias_correction2_sqrt)
            step = F32(F32(step * adaptive) * rect)
        p[i] = fma(step, F32(-1.0), param)


def init(param: np.ndarray, hp: Hyperparameters) -> TensorState:
    return {"step": F32(0), "exp_avg": zeros_like(param), "exp_avg_sq": zeros_like(param)}


def update(
    param: np.ndarray, grad: np.ndarray, state: TensorState, hp: Hyperparameters, lr: float
) -> None:
    beta1, beta2 = hp["betas"]
    step = increment_step(state["step"])
    state["step"] = step
    t = float(step)
    bias_correction2 = 1 - beta2**t
    rho_inf = 2 / (1 - beta2) - 1
    rho_t = rho_inf - 2 * t * (beta2**t) / bias_correction2
    rectified = rho_t > 5.0
    rect = 0.0
    if rectified:
        rect = (
            (rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t)
        ) ** 0.5
    launch(
        _kernel,
        (
            param.reshape(-1),
            grad.reshape(-1),
            state["exp_avg"].reshape(-1),
            state["exp_avg_sq"].reshape(-1),
        ),
        moment_scalars(hp, lr, hp["decoupled_weight_decay"]),
        F32(1 - beta1**t),
        F32(lr),
        rectified,
        F32(hp["eps"]),
        F32(bias_correction2**0.5),
        F32(rect),
    )


RADAM = register(
    Algorithm(
        name="radam",
        spec=(
            *adam_family_spec(lr=1e-3),
            Hyperparameter("decoupled_weight_decay", False, Flag()),
            Hyperparameter("maximize", False, Flag()),
        ),
        init=init,
        update=update,
    )
)
