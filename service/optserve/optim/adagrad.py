"""Adagrad with lr_decay and L2 decay: torch `_single_tensor_adagrad`, dense path (OPTIMIZERS 3.5).

State is eager: torch creates `step` and `sum` for every parameter in the constructor, so an
exported state has them before the first step.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from .base import Algorithm, Hyperparameters, TensorState, register
from .hyperparams import NON_NEGATIVE, Flag, Hyperparameter
from .kernels import F32, KERNEL, addcdiv, fma, grad_term, increment_step, launch


@njit(**KERNEL)
def _kernel(p, g, acc, maximize, l2, wd, eps, neg_clr):
    for i in range(p.shape[0]):
        d = grad_term(g[i], p[i], maximize, l2, wd)
        s = fma(d, d, acc[i])  # addcmul_(grad, grad, value=1)
        acc[i] = s
        std = F32(np.sqrt(s)) + eps  # eps outside the root, unlike optax/Keras
        p[i] = addcdiv(p[i], d, std, neg_clr)


def init(param: np.ndarray, hp: Hyperparameters) -> TensorState:
    return {
        "step": F32(0),
        "sum": np.full(param.shape, hp["initial_accumulator_value"], dtype=np.float32),
    }


def update(
    param: np.ndarray, grad: np.ndarray, state: TensorState, hp: Hyperparameters, lr: float
) -> None:
    step = increment_step(state["step"])
    state["step"] = step
    clr = lr / (1 + (float(step) - 1) * hp["lr_decay"])
    wd = hp["weight_decay"]
    launch(
        _kernel,
        (param.reshape(-1), grad.reshape(-1), state["sum"].reshape(-1)),
        hp["maximize"],
        wd != 0,
        F32(wd),
        F32(hp["eps"]),
        F32(-clr),
    )


ADAGRAD = register(
    Algorithm(
        name="adagrad",
        spec=(
            Hyperparameter("lr", 1e-2, NON_NEGATIVE),
            Hyperparameter("lr_decay", 0.0, NON_NEGATIVE),
            Hyperparameter("weight_decay", 0.0, NON_NEGATIVE),
            Hyperparameter("initial_accumulator_value", 0.0, NON_NEGATIVE),
            Hyperparameter("eps", 1e-10, NON_NEGATIVE),
            Hyperparameter("maximize", False, Flag()),
        ),
        init=init,
        update=update,
        eager_state=True,
    )
)
