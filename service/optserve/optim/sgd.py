"""SGD with momentum, dampening, Nesterov and L2 decay: torch `_single_tensor_sgd` (OPTIMIZERS 3.1)."""

from __future__ import annotations

import numpy as np

from ._grad import effective_grad
from .base import Algorithm, Hyperparameters, TensorState, register
from .errors import HyperparameterError
from .hyperparams import NON_NEGATIVE, Flag, Hyperparameter, Real
from .kernels import F32, add_, blocks, fma, temp


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
    momentum, dampening, nesterov = hp["momentum"], hp["dampening"], hp["nesterov"]
    p_flat, g_flat = param.reshape(-1), grad.reshape(-1)
    first = momentum != 0 and "momentum_buffer" not in state
    if first:
        state["momentum_buffer"] = np.empty(param.shape, dtype=np.float32)
    buf_flat = state["momentum_buffer"].reshape(-1) if momentum != 0 else None
    for block in blocks(p_flat.shape[0]):
        p = p_flat[block]
        g = effective_grad(p, g_flat[block], hp["maximize"], hp["weight_decay"])
        if buf_flat is not None:
            buf = buf_flat[block]
            if first:
                np.copyto(buf, g)
            else:
                buf *= F32(momentum)
                add_(buf, g, 1 - dampening)
            if nesterov:
                out = temp(p.shape[0], 0)
                fma(buf, F32(momentum), g, out=out)
                g = out
            else:
                g = buf
        add_(p, g, -lr)


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
