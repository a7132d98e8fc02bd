"""float32 primitives that round exactly like torch's CPU kernels (OPTIMIZERS.md section 1),
and the launcher that runs a per-element optimizer kernel over a tensor.

torch fuses `add(alpha=)`, `lerp` and `addcmul` into one FMA. A fused multiply-add is computed
here in float64 (the product of two float32 is exact there) and rounded once to float32. Each
optimizer is one compiled loop (numba) that does its whole update per element in one pass; numpy
ufuncs need four to eight passes plus float64 temporaries and measured 2-4x slower than torch's
single-tensor step. Kernels release the GIL, so large tensors are split across cores like torch's
intra-op threads.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from numba import njit

F32 = np.float32
F64 = np.float64

#: Options for every optimizer kernel: no fast-math (it would contract or reorder float32 ops and
#: break torch parity), numpy's error model (x/0 gives inf like torch, not ZeroDivisionError).
KERNEL = {"nogil": True, "cache": True, "fastmath": False, "error_model": "numpy"}
INLINE = {"inline": "always", "fastmath": False, "error_model": "numpy"}


@njit(**INLINE)
def fma(a, b, c):
    """round_f32(a*b + c) with a single rounding, like a hardware float32 FMA."""
    return F32(F64(a) * F64(b) + F64(c))


@njit(**INLINE)
def lerp(x, end, weight):
    """torch's `x.lerp_(end, weight)` for a float32 weight (ATen Lerp.h)."""
    diff = F32(end - x)
    if abs(weight) < 0.5:
        return fma(weight, diff, x)
    return fma(F32(weight - F32(1.0)), diff, end)


@njit(**INLINE)
def addcmul(x, a, b, value):
    """torch's `x.addcmul_(a, b, value=v)`: fma(v*a, b, x), the scaled factor rounded first."""
    return fma(F32(value * a), b, x)


@njit(**INLINE)
def addcdiv(x, a, b, value):
    """torch's `x.addcdiv_(a, b, value=v)`: x + (v*a)/b, three roundings, v scales the numerator."""
    return F32(x + F32(F32(value * a) / b))


@njit(**INLINE)
def maximum(a, b):
    """torch.maximum: NaN wins."""
    if a != a or b != b:
        return F32(np.nan)
    return a if a > b else b


@njit(**INLINE)
def grad_term(grad, param, maximize, l2, weight_decay):
    """The start every torch optimizer shares: negate for `maximize`, then add L2 decay (fused)."""
    g = -grad if maximize else grad
    if l2:
        g = fma(param, weight_decay, g)
    return g


@njit(**INLINE)
def adam_moments(i, p, g, m, v, scalars):
    """Element i's start shared by Adam, NAdam and RAdam: AdamW-style decay of the param, the
    gradient term, and both moment EMAs (written back). Returns (param, grad term, m, v).

    `scalars` is `moment_scalars(...)`: one tuple argument instead of eight.
    """
    maximize, l2, wd, decoupled, decay, one_minus_beta1, beta2, one_minus_beta2 = scalars
    param = F32(p[i] * decay) if decoupled else p[i]
    d = grad_term(g[i], param, maximize, l2, wd)
    mi = lerp(m[i], d, one_minus_beta1)
    m[i] = mi
    vi = addcmul(F32(v[i] * beta2), d, d, one_minus_beta2)
    v[i] = vi
    return param, d, mi, vi


def moment_scalars(hp, lr: float, decoupled: bool) -> tuple:
    """The float32 arguments of `adam_moments`, computed in float64 as torch does."""
    beta1, beta2 = hp["betas"]
    wd = hp["weight_decay"]
    return (
        hp["maximize"], wd != 0 and not decoupled, F32(wd), wd != 0 and decoupled,
        F32(1 - lr * wd), F32(1 - beta1), F32(beta2), F32(1 - beta2),
    )  # fmt: skip


# -- launching -----------------------------------------------------------------------------------

#: Below this many elements a kernel runs on the calling thread (measured: splitting 1e6 elements
#: across two threads was slower than one); above it, on every core.
PARALLEL_MIN = 1 << 21
_WORKERS = max(1, min(8, os.cpu_count() or 1))
_pool = ThreadPoolExecutor(max_workers=_WORKERS, thread_name_prefix="optserve-kernel")


def launch(kernel: Callable[..., None], arrays: tuple[np.ndarray, ...], *scalars: object) -> None:
    """Run `kernel(*arrays, *scalars)` over 1-D arrays of equal length, split across cores if large.

    Arrays of another length (empty placeholders for state an option does not use) are passed whole.
    """
    _split(kernel, *arrays, scalars=scalars)


def _split(kernel: Callable, *arrays: np.ndarray, scalars: tuple = ()) -> list:
    """`kernel` over consecutive slices of the arrays on the pool (one call if small); the
    results of the calls in order. Arrays of another length than the first are passed whole."""
    n = arrays[0].shape[0]
    parts = min(_WORKERS, n // (PARALLEL_MIN // 2)) if n >= PARALLEL_MIN else 1
    if parts <= 1:
        return [kernel(*arrays, *scalars)]
    edges = np.linspace(0, n, parts + 1).astype(np.int64)
    futures = [
        _pool.submit(kernel, *(a[lo:hi] if a.shape[0] == n else a for a in arrays), *scalars)
        for lo, hi in itertools.pairwise(edges)
    ]
    return [future.result() for future in futures]


EMPTY = np.empty(0, dtype=F32)


def flat(array: np.ndarray | None) -> np.ndarray:
    """A 1-D view of a C-contiguous float32 array (EMPTY for state an option does not keep)."""
    return EMPTY if array is None else array.reshape(-1)


def increment_step(step: F32) -> F32:
    """torch's float32 `step += 1` (it saturates at 2**24, as torch's does)."""
    return F32(F32(step) + F32(1))


@njit(nogil=True, cache=True)
def _count_non_finite(bits):
    """float32 bit patterns whose exponent is all ones (NaN, +inf, -inf): one integer pass that
    vectorises, about half the cost of numpy's min() and max() together."""
    bad = 0
    for i in range(bits.shape[0]):
        bad += (bits[i] & 0x7F800000) == 0x7F800000
    return bad


def is_finite(array: np.ndarray) -> bool:
    """True when no element of a float32 array is NaN or infinite; no temporary array."""
    if array.size == 0:
        return True
    bits = np.require(array, dtype=np.float32, requirements="C").reshape(-1).view(np.uint32)
    return sum(_split(_count_non_finite, bits)) == 0
