"""SGD with momentum, dampening, Nesterov and L2 decay: torch `_single_tensor_sgd`
(OPTIMIZERS 3.1).
"""

from __future__ import annotations

import numpy as np
from numba import njit

from .base import Algorithm, Hyperparameters, TensorState, register
from .errors import HyperparameterError
from .hyperparams import NON_NEGATIVE, Flag, Hyperparameter, Real
from .kernels import F32, KERNEL, fma, grad_term, launch


@njit(**KERNEL)
def _kernel(
    p, g, buf, maximize, l2, wd, use_momentum, first, momentum, one_minus_damp, nesterov, neg_lr
):
    for i in range(p.shape[0]):
        d = grad_term(g[i], p[i], maximize, l2, wd)
        if use_momentum:
            b = d if first else fma(d, one_minus_damp, F32(buf[i] * momentum))
            buf[i] = b
            d = fma(b, momentum, d) if nesterov else b
        p[i] = fma(d, neg_lr, p[i])


def _check(hp: dict) -> None:
    if hp["nesterov"] and (hp["momentum"] <= 0 or hp["dampening"] != 0):
        raise HyperparameterError(
            "nesterov", True, "Nesterov momentum requires momentum > 0 and dampening == 0"
        )


def init(param: np.ndarray, hp: Hyperparameters) -> TensorState:
    # The momentum buffer is born on the first step as a copy of the gradient, not as zeros.
    return {}


def update(
    param: np.ndarray, grad: np.ndarray, state: TensorState, hp: Hyperparameters, lr: float
) -> None:
    momentum = hp["momentum"]
    first = momentum != 0 and "momentum_buffer" not in state
    if first:
        state["momentum_buffer"] = np.empty(param.shape, dtype=np.float32)
    buf = state["momentum_buffer"].reshape(-1) if momentum != 0 else np.empty(0, np.float32)
    wd = hp["weight_decay"]
    launch(
        _kernel,
        (param.reshape(-1), grad.reshape(-1), buf),
        hp["maximize"],
        wd != 0,
        F32(wd),
        momentum != 0,
        first,
        F32(momentum),
        F32(1 - hp["dampening"]),
        hp["nesterov"],
        F32(-lr),
    )


SGD = register(
    Algorithm(
        name="sgd",
        spec=(
            Hyperparameter("lr", 1e-3, NON_NEGATIVE),
            Hyperparameter("momentum", 0.0, NON_NEGATIVE),
            Hyperparameter("dampening", 0.0, Real()),
            Hyperparameter("weight_decay", 0.0, NON_NEGATIVE),
            Hyperparameter("nesterov", False, Flag()),
            Hyperparameter("maximize", False, Flag()),
        ),
        init=init,
        update=update,
        check=_check,
    )
)
