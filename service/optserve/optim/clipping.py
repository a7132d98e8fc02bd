"""Global-norm gradient clipping with the numerics of torch 2.13's `clip_grad_norm_` on CPU.

torch computes each gradient's norm in float32, then the same norm over the stacked per-tensor
norms, then `coef = max_norm / (total + 1e-6)`, clamped at 1, and multiplies every gradient by it
in place.

Why the reductions here are float32 loops and not float64 sums: torch accumulates in float32, and
its rounding error grows with the tensor (measured against a float64 reference: up to 9 ulp at 10^5
elements and ~4700 ulp at 10^7 for p=2; more for p=1 and p=3). A float64 norm is more accurate but
does *not* reproduce torch, so these kernels replay torch's own accumulation order instead (each
rule below was confirmed bit-exact against torch 2.13 with its AVX-512 and AVX2 kernels; its
non-SIMD `ATEN_CPU_CAPABILITY=default` kernels round the p=2 tail differently: ~0.3% of norms, by
1 ulp):

* p=2 (the vectorised path of ATen's `norm_kernel_tensor_iterator_impl`): eight float32 lanes,
  `acc[j] += x*x` (multiply rounded, then add), lanes summed left to right; the < 8 tail elements
  are added one by one, the first multiple of four as `b + x*x` (the compiler vectorises the
  products) and the rest with a fused multiply-add.
* p=1, other finite p, inf (ATen's generic `binary_kernel_reduce`): one sequential float32
  accumulator, `acc + |x|` / `acc + powf(|x|, float32(p))`, then `powf(acc, 1/float32(p))`; inf is
  a NaN-propagating max. torch splits tensors of >= 32768 elements across its intra-op threads for
  these norms, so its result there depends on `torch.get_num_threads()`; we reproduce the
  single-thread order (exact for smaller tensors, or with `torch.set_num_threads(1)`).
* A one-element tensor's norm is `|x|` for every p (measured: torch does not reduce it, so even
  `x*x` overflowing float32 does not matter).

The kernels are compiled loops (numba): one pass over each gradient, no temporaries.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
from numba import njit

from .errors import HyperparameterError

F32 = np.float32
F64 = np.float64

#: torch's `total_norm + 1e-6`, added in float32.
EPS = F32(1e-6)
#: Largest finite norm_type: torch casts p to float32 inside the reduction.
MAX_NORM_TYPE = float(np.finfo(F32).max)

_JIT = {"nogil": True, "cache": True, "fastmath": False, "error_model": "numpy"}


def clip_grad_norm(
    grads: Mapping[str, np.ndarray], max_norm: float, norm_type: float = 2.0
) -> float:
    """Scale every gradient in place so their global `norm_type`-norm is at most `max_norm`.

    Returns the total norm *before* clipping, as torch does. Gradients must be writable C-contiguous
    float32 arrays (`update.check_gradients` guarantees it). Per-tensor norms are combined in the
    mapping's order, which changes the last bits of the total for p=2: pass the gradients in the
    order torch iterates the model's parameters. Non-finite gradients are not rejected here (torch's
    default `error_if_nonfinite=False`): a NaN total makes every gradient NaN, exactly like torch.
    """
    max_norm = _check_max_norm(max_norm)
    norm_type = _check_norm_type(norm_type)
    arrays = [_flat(name, grad) for name, grad in grads.items()]
    if not arrays:
        return 0.0
    norms = np.array([tensor_norm(flat, norm_type) for flat in arrays], dtype=F32)
    total = tensor_norm(norms, norm_type)
    coef = clip_coefficient(total, max_norm)
    if coef != F32(1.0):  # x * 1.0 == x exactly, so skipping it changes nothing
        with np.errstate(invalid="ignore"):  # inf * 0 -> NaN is torch's answer, not an accident
            for flat in arrays:
                np.multiply(flat, coef, out=flat)
    return float(total)


def clip_coefficient(total: np.float32, max_norm: float) -> np.float32:
    """torch's `clamp(max_norm / (total + 1e-6), max=1.0)` in float32.

    `float / tensor` is `Tensor.__rdiv__`, i.e. `reciprocal() * max_norm`: two roundings, which
    differs from a true division in ~13% of cases. NaN stays NaN (torch's clamp propagates it).
    """
    coef = (F32(1.0) / F32(total + EPS)) * F32(max_norm)
    return np.minimum(coef, F32(1.0))


def tensor_norm(flat: np.ndarray, norm_type: float) -> np.float32:
    """`torch.linalg.vector_norm(x, norm_type)` of a 1-D float32 array, rounded like torch's CPU."""
    if flat.size == 1:
        return abs(flat[0])
    if norm_type == 2.0:
        return _norm_two(flat)
    if norm_type == 1.0:
        return _norm_one(flat)
    if norm_type == math.inf:
        return _norm_inf(flat)
    return _norm_p(flat, F32(norm_type))


# ----------------------------------------------------------------------------------------------
# Validation


def _check_max_norm(max_norm: float) -> float:
    if not _is_number(max_norm) or not math.isfinite(max_norm) or max_norm <= 0:
        raise HyperparameterError("clip_grad_norm", max_norm, "a finite number > 0")
    return float(max_norm)


def _check_norm_type(norm_type: float) -> float:
    ok = _is_number(norm_type) and (norm_type == math.inf or 0 < norm_type <= MAX_NORM_TYPE)
    if not ok:
        raise HyperparameterError(
            "clip_norm_type", norm_type, "a number > 0 (at most float32 max) or inf"
        )
    return float(norm_type)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _flat(name: str, grad: np.ndarray) -> np.ndarray:
    """A 1-D view that writes through to `grad`; anything else would clip a copy."""
    if not isinstance(grad, np.ndarray) or grad.dtype != F32 or not grad.flags.c_contiguous:
        raise TypeError(f"gradient {name!r} must be a C-contiguous float32 numpy array")
    return grad.reshape(-1)


# ----------------------------------------------------------------------------------------------
# Kernels: each replays one torch CPU reduction loop (see the module docstring).


@njit(**_JIT)
def _fma32(a, b, c):
    """round_f32(a*b + c) with one rounding (a hardware FMA), exactly.

    a*b is exact in float64; the float64 sum can round once more, which only matters when it lands
    exactly on a float32 tie: then the sum's error term (TwoSum) says which way the FMA rounds.
    """
    p = F64(a) * F64(b)
    c64 = F64(c)
    r = p + c64
    v = r - p
    err = (p - (r - v)) + (c64 - v)
    r32 = F32(r)
    if err == 0.0 or F64(r32) == r:
        return r32
    other = np.nextafter(r32, F32(np.inf) if r > F64(r32) else F32(-np.inf))
    if r - F64(r32) != F64(other) - r:
        return r32
    if (err > 0.0) == (F64(other) > F64(r32)):
        return other
    return r32


@njit(**_JIT)
def _norm_two(x):
    """ATen's vectorised p=2 loop: 8 float32 lanes, then the tail as GCC compiled it."""
    n = x.size
    m = n - n % 8
    acc = np.zeros(8, dtype=np.float32)
    for i in range(0, m, 8):
        for j in range(8):
            v = x[i + j]
            acc[j] = acc[j] + v * v
    total = acc[0]
    for j in range(1, 8):
        total = total + acc[j]
    vectorised_tail = m + (n - m) // 4 * 4
    for i in range(m, vectorised_tail):
        v = x[i]
        total = total + v * v
    for i in range(vectorised_tail, n):
        total = _fma32(x[i], x[i], total)
    return np.sqrt(total)


@njit(**_JIT)
def _norm_one(x):
    """ATen's NormOneOps: sequential float32 sum of |x|."""
    acc = F32(0.0)
    for i in range(x.size):
        acc = acc + abs(x[i])
    return acc


@njit(**_JIT)
def _norm_p(x, p):
    """ATen's NormOps: sequential float32 sum of powf(|x|, p), then powf(sum, 1/p), p float32."""
    acc = F32(0.0)
    for i in range(x.size):
        acc = acc + abs(x[i]) ** p
    return acc ** (F32(1.0) / p)


@njit(**_JIT)
def _norm_inf(x):
    """ATen's AbsMaxOps: max |x|, NaN wins (an empty tensor gives 0; torch raises there)."""
    acc = F32(0.0)
    for i in range(x.size):
        a = abs(x[i])
        if a != a:
            return a
        if a > acc:
            acc = a
    return acc
