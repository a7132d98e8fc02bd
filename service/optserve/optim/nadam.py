"""NAdam with torch's momentum-decay schedule (`mu_product`): `_single_tensor_nadam` (OPTIMIZERS 3.7)."""

from __future__ import annotations

import numpy as np

from ._grad import effective_grad
from .base import Algorithm, Hyperparameters, TensorState, register, zeros_like
from .hyperparams import NON_NEGATIVE, UNIT_INTERVAL, Flag, Hyperparameter, Pair
from .kernels import F32, addcdiv_, addcmul_, blocks, increment_step, lerp_, temp


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
    weight_decay, psi = hp["weight_decay"], hp["momentum_decay"]
    decoupled = hp["decoupled_weight_decay"]
    step = increment_step(state["step"])
    state["step"] = step
    t = float(step)
    bias_correction2 = 1 - beta2**t
    mu = beta1 * (1.0 - 0.5 * (0.96 ** (t * psi)))
    mu_next = beta1 * (1.0 - 0.5 * (0.96 ** ((t + 1) * psi)))
    mu_product = F32(state["mu_product"] * F32(mu))  # a float32 tensor in torch, rounded each step
    state["mu_product"] = mu_product
    grad_value = -lr * (1.0 - mu) / (1.0 - float(mu_product))
    avg_value = (-lr * mu_next) / (1.0 - float(mu_product) * mu_next)
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
        denom = temp(p.shape[0], 1)
        np.divide(v, F32(bias_correction2), out=denom)  # divided inside the sqrt, unlike Adam
        np.sqrt(denom, out=denom)
        denom += F32(hp["eps"])
        addcdiv_(p, g, denom, grad_value)
        addcdiv_(p, m, denom, avg_value)


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
