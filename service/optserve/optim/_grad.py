"""The first lines every torch optimizer shares: `maximize` negation and L2 weight decay."""

from __future__ import annotations

import numpy as np

from .kernels import add_, temp


def effective_grad(param: np.ndarray, grad: np.ndarray, maximize: bool, l2: float) -> np.ndarray:
    """g = -grad if maximize; g = g + l2*param (fused, like `grad.add(param, alpha=wd)`).

    Works on one block. Returns `grad` itself when nothing changes, else scratch buffer 0, so the
    caller's gradient is never written.
    """
    if not maximize and l2 == 0:
        return grad
    g = temp(grad.shape[0], 0)
    if maximize:
        np.negative(grad, out=g)
    else:
        np.copyto(g, grad)
    if l2 != 0:
        add_(g, param, l2)
    return g
