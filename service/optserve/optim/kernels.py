"""float32 primitives that round exactly like torch's CPU kernels (OPTIMIZERS.md section 1).

torch fuses `add(alpha=)`, `lerp` and `addcmul` into one FMA; numpy has no FMA ufunc, so a fused
multiply-add is computed in float64 (the product of two float32 is exact there) and rounded once to
float32. Arrays are walked in blocks small enough that the float64 scratch stays in cache: this keeps
the emulation close to the speed of plain float32 passes and allocates nothing per step.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import numpy as np

F32 = np.float32
F64 = np.float64

#: Elements per block: 16 Ki float64 scratch = 128 KiB, comfortably inside L2.
BLOCK = 1 << 14


class _Scratch(threading.local):
    """Per-thread scratch buffers, reused across blocks and steps (no per-step allocation)."""

    def __init__(self) -> None:
        self.wide = np.empty(BLOCK, dtype=F64)
        self.narrow = [np.empty(BLOCK, dtype=F32) for _ in range(3)]


_scratch = _Scratch()


def blocks(size: int) -> Iterator[slice]:
    """Slices that cover `range(size)` in cache-sized blocks."""
    for start in range(0, size, BLOCK):
        yield slice(start, min(start + BLOCK, size))


def temp(n: int, index: int = 0) -> np.ndarray:
    """A float32 scratch view of length n (n <= BLOCK); index picks one of three buffers."""
    return _scratch.narrow[index][:n]


def fma(a: np.ndarray | F32, b: np.ndarray | F32, c: np.ndarray | F32, out: np.ndarray) -> None:
    """out = round_f32(a*b + c) with one rounding, like a hardware float32 FMA.

    `out` may alias any input: it is written only after all inputs were read.
    """
    wide = _scratch.wide[: out.shape[0]]
    np.multiply(a, b, out=wide, dtype=F64)
    np.add(wide, c, out=wide)
    np.copyto(out, wide, casting="same_kind")


def add_(x: np.ndarray, y: np.ndarray, alpha: float) -> None:
    """x.add_(y, alpha=alpha): x = fma(y, f32(alpha), x)."""
    fma(y, F32(alpha), x, out=x)


def lerp_(x: np.ndarray, end: np.ndarray, weight: float) -> None:
    """x.lerp_(end, weight) with a Python-float weight (ATen LerpKernel / Lerp.h)."""
    w = F32(weight)
    diff = temp(x.shape[0], 2)
    np.subtract(end, x, out=diff)
    if abs(w) < 0.5:
        fma(w, diff, x, out=x)
    else:
        fma(F32(w - F32(1)), diff, end, out=x)


def addcmul_(x: np.ndarray, a: np.ndarray, b: np.ndarray, value: float) -> None:
    """x.addcmul_(a, b, value=v): fma(f32(v)*a, b, x), the scaled factor rounded first."""
    v = F32(value)
    if v == F32(1):
        fma(a, b, x, out=x)
        return
    scaled = temp(x.shape[0], 2)
    np.multiply(a, v, out=scaled)
    fma(scaled, b, x, out=x)


def addcdiv_(x: np.ndarray, a: np.ndarray, b: np.ndarray, value: float) -> None:
    """x.addcdiv_(a, b, value=v): x + (f32(v)*a)/b with three roundings (value scales the numerator)."""
    quotient = temp(x.shape[0], 2)
    np.multiply(a, F32(value), out=quotient)
    np.divide(quotient, b, out=quotient)
    np.add(x, quotient, out=x)


def is_finite(array: np.ndarray) -> bool:
    """True when no element is NaN or infinite; two reductions, no temporary array."""
    if array.size == 0:
        return True
    return bool(np.isfinite(array.min()) and np.isfinite(array.max()))


def increment_step(step: F32) -> F32:
    """torch's float32 `step += 1` (saturates at 2**24, as torch's does)."""
    return F32(F32(step) + F32(1))
