"""Adagrad with lr_decay and L2 decay: torch `_single_tensor_adagrad`, dense path (OPTIMIZERS 3.5).

State is eager: torch creates `step` and `sum` for every parameter in the constructor, so an
exported state has them before the first step.
"""

from __future__ import annotations

import numpy as np

from ._grad import effective_grad
from .base import Algorithm, Hyperparameters, TensorState, register
from .hyperparams import NON_NEGATIVE, Flag, Hyperparameter
from .kernels import F32, addcdiv_, blocks, fma, increment_step, temp


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
    p_flat, g_flat, sum_flat = param.reshape(-1), grad.reshape(-1), state["sum"].reshape(-1)
    for block in blocks(p_flat.shape[0]):
        p = p_flat[block]
        g = effective_grad(p, g_flat[block], hp["maximize"], hp["weight_decay"])
        acc = sum_flat[block]
        fma(g, g, acc, out=acc)  # addcmul_(grad, grad, value=1)
        std = temp(p.shape[0], 1)
        np.sqrt(acc, out=std)
        std += F32(hp["eps"])
        addcdiv_(p, g, std, -clr)


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
