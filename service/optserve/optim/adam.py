"""Adam, AMSGrad and AdamW: torch `_single_tensor_adam` (OPTIMIZERS 3.2, 3.3)."""

from __future__ import annotations

import numpy as np

from ._grad import effective_grad
from .base import Algorithm, Hyperparameters, TensorState, register, zeros_like
from .hyperparams import NON_NEGATIVE, UNIT_INTERVAL, Flag, Hyperparameter, Pair
from .kernels import F32, addcdiv_, addcmul_, blocks, increment_step, lerp_, temp


def init(param: np.ndarray, hp: Hyperparameters) -> TensorState:
    state: TensorState = {
        "step": F32(0),
        "exp_avg": zeros_like(param),
        "exp_avg_sq": zeros_like(param),
    }
    if hp["amsgrad"]:
        state["max_exp_avg_sq"] = zeros_like(param)
    return state


def step_adam(
    param: np.ndarray,
    grad: np.ndarray,
    state: TensorState,
    hp: Hyperparameters,
    lr: float,
    decoupled: bool,
) -> None:
    """One Adam step of one tensor; `decoupled` selects AdamW's multiplicative decay."""
    beta1, beta2 = hp["betas"]
    weight_decay = hp["weight_decay"]
    step = increment_step(state["step"])
    state["step"] = step
    t = float(step)
    # Scalars in float64 as torch computes them; each becomes float32 only at its kernel.
    step_size = lr / (1 - beta1**t)
    bias_correction2_sqrt = (1 - beta2**t) ** 0.5
    p_flat, g_flat = param.reshape(-1), grad.reshape(-1)
    m_flat, v_flat = state["exp_avg"].reshape(-1), state["exp_avg_sq"].reshape(-1)
    vmax_flat = state["max_exp_avg_sq"].reshape(-1) if hp["amsgrad"] else None
    for block in blocks(p_flat.shape[0]):
        p = p_flat[block]
        if decoupled and weight_decay != 0:
            p *= F32(1 - lr * weight_decay)
        g = effective_grad(p, g_flat[block], hp["maximize"], 0.0 if decoupled else weight_decay)
        m, v = m_flat[block], v_flat[block]
        lerp_(m, g, 1 - beta1)
        v *= F32(beta2)
        addcmul_(v, g, g, 1 - beta2)
        if vmax_flat is not None:
            vmax = vmax_flat[block]
            np.maximum(vmax, v, out=vmax)
            v = vmax
        denom = temp(p.shape[0], 1)
        np.sqrt(v, out=denom)
        denom /= F32(bias_correction2_sqrt)
        denom += F32(hp["eps"])
        addcdiv_(p, m, denom, -step_size)


def update(
    param: np.ndarray, grad: np.ndarray, state: TensorState, hp: Hyperparameters, lr: float
) -> None:
    step_adam(param, grad, state, hp, lr, decoupled=hp["decoupled_weight_decay"])


def update_adamw(
    param: np.ndarray, grad: np.ndarray, state: TensorState, hp: Hyperparameters, lr: float
) -> None:
    step_adam(param, grad, state, hp, lr, decoupled=True)


_COMMON = (
    Hyperparameter("lr", 1e-3, NON_NEGATIVE),
    Hyperparameter("betas", (0.9, 0.999), Pair(UNIT_INTERVAL)),
    Hyperparameter("eps", 1e-8, NON_NEGATIVE),
)

ADAM = register(
    Algorithm(
        name="adam",
        spec=(
            *_COMMON,
            Hyperparameter("weight_decay", 0.0, NON_NEGATIVE),
            Hyperparameter("amsgrad", False, Flag()),
            Hyperparameter("maximize", False, Flag()),
            Hyperparameter("decoupled_weight_decay", False, Flag()),
        ),
        init=init,
        update=update,
    )
)

ADAMW = register(
    Algorithm(
        name="adamw",
        spec=(
            *_COMMON,
            Hyperparameter("weight_decay", 1e-2, NON_NEGATIVE),
            Hyperparameter("amsgrad", False, Flag()),
            Hyperparameter("maximize", False, Flag()),
        ),
        init=init,
        update=update_adamw,
    )
)
