"""RMSprop, plain or centered, with momentum: torch `_single_tensor_rmsprop` (OPTIMIZERS 3.4).

No bias correction and `square_avg` starts at zero, so the first step is about 10*lr per element
for alpha=0.99; that is torch's behaviour and users comparing runs expect it.
"""

from __future__ import annotations

import numpy as np

from ._grad import effective_grad
from .base import Algorithm, Hyperparameters, TensorState, register, zeros_like
from .hyperparams import NON_NEGATIVE, Flag, Hyperparameter
from .kernels import F32, add_, addcdiv_, addcmul_, blocks, increment_step, lerp_, temp


def init(param: np.ndarray, hp: Hyperparameters) -> TensorState:
    state: TensorState = {"step": F32(0), "square_avg": zeros_like(param)}
    if hp["momentum"] > 0:
        state["momentum_buffer"] = zeros_like(param)
    if hp["centered"]:
        state["grad_avg"] = zeros_like(param)
    return state


def update(
    param: np.ndarray, grad: np.ndarray, state: TensorState, hp: Hyperparameters, lr: float
) -> None:
    alpha, momentum, centered = hp["alpha"], hp["momentum"], hp["centered"]
    state["step"] = increment_step(state["step"])  # kept for torch's state_dict; unused by the math
    p_flat, g_flat = param.reshape(-1), grad.reshape(-1)
    sq_flat = state["square_avg"].reshape(-1)
    ga_flat = state["grad_avg"].reshape(-1) if centered else None
    buf_flat = state["momentum_buffer"].reshape(-1) if momentum > 0 else None
    for block in blocks(p_flat.shape[0]):
        p = p_flat[block]
        g = effective_grad(p, g_flat[block], hp["maximize"], hp["weight_decay"])
        sq = sq_flat[block]
        sq *= F32(alpha)
        addcmul_(sq, g, g, 1 - alpha)
        avg = temp(p.shape[0], 1)
        if ga_flat is not None:
            ga = ga_flat[block]
            lerp_(ga, g, 1 - alpha)
            np.copyto(avg, sq)
            addcmul_(avg, ga, ga, -1)  # may round below zero -> NaN, exactly as torch does
            np.sqrt(avg, out=avg)
        else:
            np.sqrt(sq, out=avg)
        avg += F32(hp["eps"])
        if buf_flat is not None:
            buf = buf_flat[block]
            buf *= F32(momentum)
            addcdiv_(buf, g, avg, 1)
            add_(p, buf, -lr)
        else:
            addcdiv_(p, g, avg, -lr)


RMSPROP = register(
    Algorithm(
        name="rmsprop",
        spec=(
            Hyperparameter("lr", 1e-2, NON_NEGATIVE),
            Hyperparameter("alpha", 0.99, NON_NEGATIVE),
            Hyperparameter("eps", 1e-8, NON_NEGATIVE),
            Hyperparameter("weight_decay", 0.0, NON_NEGATIVE),
            Hyperparameter("momentum", 0.0, NON_NEGATIVE),
            Hyperparameter("centered", False, Flag()),
            Hyperparameter("maximize", False, Flag()),
        ),
        init=init,
        update=update,
    )
)
