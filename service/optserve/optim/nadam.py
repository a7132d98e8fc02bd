"""NAdam with torch's momentum-decay schedule (`mu_product`): `_single_tensor_nadam`
(OPTIMIZERS 3.7).
"""

from __future__ import annotations

import numpy as np
from numba import njit

from .base import Algorithm, Hyperparameters, TensorState, register, zeros_like
from .hyperparams import NON_NEGATIVE, UNIT_INTERVAL, Flag, Hyperparameter, Pair
from .kernels import F32, KERNEL, addcdiv, addcmul, grad_term, increment_step, launch, lerp


@njit(**KERNEL)
def _kernel(
    p,
    g,
    m,
    v,
    maximize,
    l2,
    wd,
    decoupled,
    decay,
    one_minus_beta1,
    beta2,
    one_minus_beta2,
    bias_correction2,
    eps,
    grad_value,
    avg_value,
):
    for i in range(p.shape[0]):
        param = F32(p[i] * decay) if decoupled else p[i]
        d = grad_term(g[i], param, maximize, l2, wd)
        mi = lerp(m[i], d, one_minus_beta1)
        m[i] = mi
        vi = addcmul(F32(v[i] * beta2), d, d, one_minus_beta2)
        v[i] = vi
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
    wd, psi, decoupled = hp["weight_decay"], hp["momentum_decay"], hp["decoupled_weight_decay"]
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
        hp["maximize"],
        wd != 0 and not decoupled,
        F32(wd),
        wd != 0 and decoupled,
        F32(1 - lr * wd),
        F32(1 - beta1),
        F32(beta2),
        F32(1 - beta2),
        F32(1 - beta2**t),
        F32(hp["eps"]),
        F32(grad_value),
        F32(avg_value),
    )


NADAM = register(
    Algorithm(
        name="nadam",
        spec=(
            Hyperparameter("lr", 2e-3, NON_NEGATIVE),
            Hyperparameter("betas", (0.9, 0.999), Pair(UNIT_INTERVAL)),
            Hyperparameter("eps", 1e-8, NON_NEGATIVE),
            Hyperparameter("weight_decay", 0.0, NON_NEGATIVE),
            Hyperparameter("momentum_decay", 4e-3, NON_NEGATIVE),
            Hyperparameter("decoupled_weight_decay", False, Flag()),
            Hyperparameter("maximize", False, Flag()),
        ),
        init=init,
        update=update,
    )
)
