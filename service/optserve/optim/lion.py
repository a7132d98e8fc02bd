"""Lion (sign momentum), timm's formulation (OPTIMIZERS 3.10); torch.optim has no Lion.

timm's op sequence is followed so a torch user can check it with the same few torch ops; decoupled
decay multiplies by f32(1 - lr*wd) like AdamW.
"""

from __future__ import annotations

import numpy as np

from .base import Algorithm, Hyperparameters, TensorState, register, zeros_like
from .hyperparams import NON_NEGATIVE, UNIT_INTERVAL, Flag, Hyperparameter, Pair
from .kernels import F32, add_, blocks, lerp_, temp


def init(param: np.ndarray, hp: Hyperparameters) -> TensorState:
    return {"exp_avg": zeros_like(param)}


def update(
    param: np.ndarray, grad: np.ndarray, state: TensorState, hp: Hyperparameters, lr: float
) -> None:
    beta1, beta2 = hp["betas"]
    weight_decay = hp["weight_decay"]
    p_flat, g_flat, m_flat = param.reshape(-1), grad.reshape(-1), state["exp_avg"].reshape(-1)
    for block in blocks(p_flat.shape[0]):
        p, m, g = p_flat[block], m_flat[block], g_flat[block]
        if hp["maximize"]:
            negated = temp(p.shape[0], 0)
            np.negative(g, out=negated)
            g = negated
        if weight_decay != 0:
            p *= F32(1 - lr * weight_decay)
        direction = temp(p.shape[0], 1)
        np.multiply(m, F32(beta1), out=direction)  # exp_avg.mul(beta1).add_(grad, alpha=1-beta1)
        add_(direction, g, 1 - beta1)
        np.sign(direction, out=direction)
        add_(p, direction, -lr)
        lerp_(m, g, 1 - beta2)


LION = register(
    Algorithm(
        name="lion",
        spec=(
            Hyperparameter("lr", 1e-4, NON_NEGATIVE),
            Hyperparameter("betas", (0.9, 0.99), Pair(UNIT_INTERVAL)),
            Hyperparameter("weight_decay", 0.0, NON_NEGATIVE),
            Hyperparameter("maximize", False, Flag()),
        ),
        init=init,
        update=update,
    )
)
