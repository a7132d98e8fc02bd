"""Lion (sign momentum), timm's formulation (OPTIMIZERS 3.10); torch.optim has no Lion.

timm's op sequence is followed so a torch user can check it with the same few torch ops; decoupled
decay multiplies by f32(1 - lr*wd) like AdamW.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from .base import Algorithm, Hyperparameters, TensorState, register, zeros_like
from .hyperparams import NON_NEGATIVE, UNIT_INTERVAL, Flag, Hyperparameter, Pair
from .kernels import F32, KERNEL, fma, launch, lerp


@njit(**KERNEL)
def _kernel(p, g, m, maximize, decay, beta1, one_minus_beta1, one_minus_beta2, neg_lr):
    for i in range(p.shape[0]):
        d = -g[i] if maximize else g[i]
        param = F32(p[i] * decay)
        c = fma(d, one_minus_beta1, F32(m[i] * beta1))  # exp_avg.mul(b1).add_(grad, alpha=1-b1)
        direction = F32(np.sign(c))
        p[i] = fma(direction, neg_lr, param)
        m[i] = lerp(m[i], d, one_minus_beta2)


def init(param: np.ndarray, hp: Hyperparameters) -> TensorState:
    return {"exp_avg": zeros_like(param)}


def update(
    param: np.ndarray, grad: np.ndarray, state: TensorState, hp: Hyperparameters, lr: float
) -> None:
    beta1, beta2 = hp["betas"]
    launch(
        _kernel,
        (param.reshape(-1), grad.reshape(-1), state["exp_avg"].reshape(-1)),
        hp["maximize"],
        F32(1 - lr * hp["weight_decay"]),
        F32(beta1),
        F32(1 - beta1),
        F32(1 - beta2),
        F32(-lr),
    )


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
