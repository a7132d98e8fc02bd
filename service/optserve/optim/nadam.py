"""NAdam with torch's momentum-decay schedule (`mu_product`): `_single_tensor_nadam`
(OPTIMIZERS 3.7).
"""

from __future__ import annotations

import numpy as np
from numba import njit

from .adam import adam_family_spec
from .base import Algorithm, Hyperparameters, TensorState, register, zeros_like
from .hyperparams import NON_NEGATIVE, Flag, Hyperparameter
from .kernels import F32, KERNEL, adam_moments, addcdiv, increment_step, launch, moment_scalars


@njit(**KERNEL)
def _kernel(
    p,
    g,
    m,
    v,
    moments,
    bias_correction2,
    eps,
    grad_value,
    avg_value,
):
    for i in range(p.shape[0]):
        param, d, mi, vi = adam_moments(i, p, g, m, v, moments)
        denom = F32(np.sqrt(F32(vi / bias_correction2))) + eps  # divided inside the root
        param = addcdiv(param, d, denom, grad_value)
        p[i] = addcdiv(param, mi, denom, avg_value)


def init(param: np.ndarray, hp: Hyperparameters) -> TensorState:
    return {
        "step": F32(0),
        "mu_product": F32(1),
        "exp_avg": zeros_like(param),
        "exp_avg_sq": zeros_like(param),
    }


def update(
    param: np.ndarray, grad: np.ndarray, state: TensorState, hp: Hyperparameters, lr: float
) -> None:
    beta1, beta2 = hp["betas"]
    psi = hp["momentum_decay"]
    step = increment_step(state["step"])
    state["step"] = step
    t = float(step)
    mu = beta1 * (1.0 - 0.5 * (0.96 ** (t * psi)))
    mu_next = beta1 * (1.0 - 0.5 * (0.96 ** ((t + 1) * psi)))
    mu_product = F32(state["mu_product"] * F32(mu))  # a float32 tensor in torch, rounded each step
    state["mu_product"] = mu_product
    grad_value = -lr * (1.0 - mu) / (1.0 - float(mu_product))
    avg_value = (-lr * mu_next) / (1.0 - float(mu_product) * mu_next)
    launch(
        _kernel,
        (
            param.reshape(-1),
            grad.reshape(-1),
            state["exp_avg"].reshape(-1),
            state["exp_avg_sq"].reshape(-1),
        ),
        moment_scalars(hp, lr, hp["decoupled_weight_decay"]),
        F32(1 - beta2**t),
        F32(hp["eps"]),
        F32(grad_value),
        F32(avg_value),
    )


NADAM = register(
    Algorithm(
        name="nadam",
        spec=(
            *adam_family_spec(lr=2e-3),
            Hyperparameter("momentum_decay", 4e-3, NON_NEGATIVE),
            Hyperparameter("decoupled_weight_decay", False, Flag()),
            Hyperparameter("maximize", False, Flag()),
        ),
        init=init,
        update=update,
    )
)
