"""Global-norm clipping against torch.nn.utils.clip_grad_norm_ itself (expectations computed here).

Tolerance is 1 float32 ulp, as specified; the kernels replay torch's CPU accumulation order, so the
results are expected to be bit-identical, and `test_exact_rate` reports that.
"""

from __future__ import annotations

import math
import tracemalloc
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from optserve.optim.clipping import clip_grad_norm, tensor_norm
from optserve.optim.errors import HyperparameterError

F32 = np.float32
INF = math.inf
NORM_TYPES = [2.0, 1.0, INF, 3.0]

Shapes = Sequence[tuple[int, ...]]
SETS: dict[str, Shapes] = {
    "scalar": [()],
    "1d": [(1000,)],
    "3d": [(4, 5, 6)],
    "mixed": [(), (7,), (3, 3, 3), (1000,), (33, 17), (1,), (5,)],
    "tails": [(8,), (9,), (12,), (13,), (15,), (16,), (2, 3)],
    "with-empty": [(0,), (10,), (3, 0)],
    "large": [(40_001,), (3,), (250, 129)],
}


@pytest.fixture(autouse=True)
def one_torch_thread() -> Iterator[None]:
    """For p != 2 torch splits tensors of >= 32768 elements across threads (see clipping.py)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_grads(shapes: Shapes, seed: int, scale: float) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        f"p{i}": np.array(rng.standard_normal(shape) * scale, dtype=F32)
        for i, shape in enumerate(shapes)
    }


def torch_clip(
    grads: dict[str, np.ndarray], max_norm: float, norm_type: float
) -> tuple[F32, dict[str, np.ndarray]]:
    """torch's clip_grad_norm_ on copies of `grads` (in the same order): (total, clipped grads)."""
    params = []
    for grad in grads.values():
        param = torch.nn.Parameter(torch.zeros(grad.shape))
        param.grad = torch.from_numpy(grad.copy())
        params.append(param)
    total = torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type)
    assert total.dtype == torch.float32
    clipped = {name: p.grad.numpy() for name, p in zip(grads, params, strict=True)}
    return F32(total.item()), clipped


def ulps(a: Any, b: Any) -> np.ndarray:
    """Distance in float32 units in the last place (NaN vs NaN counts as 0)."""
    a, b = np.asarray(a, dtype=F32), np.asarray(b, dtype=F32)

    def ordered(x: np.ndarray) -> np.ndarray:
        bits = x.view(np.int32).astype(np.int64)
        return np.where(bits < 0, -(bits & 0x7FFFFFFF), bits)

    both_nan = np.isnan(a) & np.isnan(b)
    return np.where(both_nan, 0, np.abs(ordered(a) - ordered(b)))


def check_against_torch(
    grads: dict[str, np.ndarray], max_norm: float, norm_type: float
) -> tuple[int, int]:
    """Clip `grads` both ways; assert <= 1 ulp; return (bit-identical values, values compared)."""
    expected_total, expected = torch_clip(grads, max_norm, norm_type)
    originals = {name: grad for name, grad in grads.items()}
    total = clip_grad_norm(grads, max_norm, norm_type)
    assert isinstance(total, float)
    assert ulps(total, expected_total) <= 1, (total, expected_total)
    exact, count = int(F32(total) == expected_total), 1
    for name, grad in grads.items():
        assert grad is originals[name]  # clipped in place, like torch
        assert grad.dtype == F32
        diff = ulps(grad, expected[name])
        assert diff.size == 0 or diff.max() <= 1, name
        exact += int((diff == 0).sum())
        count += diff.size
    return exact, count


# ----------------------------------------------------------------------------------------------
# parity


@pytest.mark.parametrize("norm_type", NORM_TYPES, ids=lambda p: f"p={p}")
@pytest.mark.parametrize("scale", [1e-3, 1.0, 30.0], ids=["small", "unit", "big"])
@pytest.mark.parametrize("name", list(SETS))
def test_matches_torch(name: str, scale: float, norm_type: float) -> None:
    if name == "with-empty" and norm_type == INF:
        pytest.skip("torch raises for the inf-norm of an empty tensor; see test_empty_tensor")
    for max_norm in (0.5, 1.0, 7.3, 1e4):
        grads = make_grads(SETS[name], seed=len(name), scale=scale)
        check_against_torch(grads, max_norm, norm_type)


def test_exact_rate(capsys: pytest.CaptureFixture[str]) -> None:
    """Headline number: fraction of totals and clipped values bit-identical to torch."""
    exact = count = 0
    for seed, (name, shapes) in enumerate(SETS.items()):
        for norm_type in (*NORM_TYPES, 0.5, 2.5):
            if name == "with-empty" and norm_type == INF:
                continue
            for scale, max_norm in ((1e-3, 1.0), (1.0, 0.7), (30.0, 5.0)):
                got = check_against_torch(make_grads(shapes, seed, scale), max_norm, norm_type)
                exact, count = exact + got[0], count + got[1]
    with capsys.disabled():
        print(f"\nclipping: {exact}/{count} values bit-identical to torch ({exact / count:.4%})")
    assert exact == count


@pytest.mark.parametrize("size", [1, 2, 3, 4, 5, 7, 8, 11, 12, 15, 17, 1001, 100_003])
def test_p2_tensor_norm_exact_with_torch_default_threads(size: int) -> None:
    """p=2 takes torch's vectorised single-accumulator path, whatever its thread count."""
    torch.set_num_threads(2)
    rng = np.random.default_rng(size)
    for _ in range(30 if size < 1000 else 3):
        x = (rng.standard_normal(size) * np.exp(rng.uniform(-8, 8))).astype(F32)
        assert tensor_norm(x, 2.0) == F32(torch.linalg.vector_norm(torch.from_numpy(x)).item())


@pytest.mark.parametrize("norm_type", [2.0, 1.0, INF, 3.0, 0.5, 7.0])
def test_per_tensor_norms_exact_at_any_magnitude(norm_type: float) -> None:
    """Overflow and underflow in torch's float32 accumulators are reproduced, not avoided."""
    rng = np.random.default_rng(3)
    for _ in range(200):
        size = int(rng.integers(0 if norm_type != INF else 1, 300))
        x = (rng.standard_normal(size) * np.exp(rng.uniform(-60, 60))).astype(F32)
        expected = F32(torch.linalg.vector_norm(torch.from_numpy(x), norm_type).item())
        assert ulps(tensor_norm(x, norm_type), expected) == 0


@pytest.mark.parametrize("norm_type", NORM_TYPES)
def test_below_threshold_grads_keep_their_values(norm_type: float) -> None:
    grads = make_grads(SETS["mixed"], seed=9, scale=1e-3)
    before = {name: grad.copy() for name, grad in grads.items()}
    total = clip_grad_norm(grads, 100.0, norm_type)
    assert total < 100.0
    for name, grad in grads.items():
        assert np.array_equal(grad, before[name])
        assert np.array_equal(grad.view(np.int32), before[name].view(np.int32))


@pytest.mark.parametrize("norm_type", NORM_TYPES)
def test_above_threshold_the_clipped_norm_is_max_norm(norm_type: float) -> None:
    grads = make_grads(SETS["mixed"], seed=4, scale=10.0)
    total = clip_grad_norm(grads, 1.0, norm_type)
    assert total > 1.0
    again = clip_grad_norm(grads, 1e9, norm_type)
    assert again == pytest.approx(1.0, rel=1e-5)


def test_returns_the_pre_clip_norm() -> None:
    grads = {"w": np.full(4, 3.0, dtype=F32)}
    assert clip_grad_norm(grads, 1.0) == 6.0
    assert np.all(grads["w"] < 0.5)


def test_no_gradients_is_a_zero_norm() -> None:
    assert clip_grad_norm({}, 1.0) == 0.0


def test_empty_tensor() -> None:
    """A zero-size gradient contributes 0; for the inf-norm torch raises instead, we return 0."""
    grads = {"empty": np.zeros((0, 3), dtype=F32), "w": np.full(3, 2.0, dtype=F32)}
    assert clip_grad_norm(grads, 1.0, INF) == 2.0
    assert clip_grad_norm({"empty": np.zeros(0, dtype=F32)}, 1.0, 2.0) == 0.0


@pytest.mark.parametrize("norm_type", NORM_TYPES)
@pytest.mark.parametrize("bad", [np.inf, np.nan, 1e20])
def test_non_finite_and_overflowing_grads_behave_like_torch(norm_type: float, bad: float) -> None:
    """torch's error_if_nonfinite=False: an inf/NaN total scales the grads to 0/NaN."""
    grads = make_grads([(50,), (3, 4)], seed=1, scale=1.0)
    grads["p0"][7] = bad
    if bad == 1e20:
        grads["p0"][:] = 1e20  # squares overflow torch's float32 accumulator
    check_against_torch(grads, 1.0, norm_type)


def test_does_not_copy_large_gradients() -> None:
    """Reductions and scaling run in place: no temporaries the size of the gradient."""
    grads = make_grads([(4_000_000,), (1000,)], seed=2, scale=1.0)
    clip_grad_norm({"w": np.ones(16, dtype=F32)}, 1.0)  # compile outside the measurement
    tracemalloc.start()
    clip_grad_norm(grads, 0.5)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 1 << 20


# ----------------------------------------------------------------------------------------------
# validation


@pytest.mark.parametrize("max_norm", [0.0, -1.0, math.nan, math.inf, "1.0", True, None])
def test_invalid_max_norm(max_norm: Any) -> None:
    grads = make_grads([(3,)], seed=0, scale=1.0)
    before = grads["p0"].copy()
    with pytest.raises(HyperparameterError) as info:
        clip_grad_norm(grads, max_norm)
    assert info.value.field == "clip_grad_norm"
    assert np.array_equal(grads["p0"], before)


@pytest.mark.parametrize("norm_type", [0.0, -2.0, math.nan, -math.inf, 1e39, "inf", True])
def test_invalid_norm_type(norm_type: Any) -> None:
    with pytest.raises(HyperparameterError) as info:
        clip_grad_norm(make_grads([(3,)], seed=0, scale=1.0), 1.0, norm_type)
    assert info.value.field == "clip_norm_type"


@pytest.mark.parametrize(
    "grad",
    [np.ones(4, dtype=np.float64), np.ones((4, 4), dtype=F32)[:, 1], [1.0, 2.0]],
    ids=["float64", "strided", "list"],
)
def test_gradients_must_be_contiguous_float32_arrays(grad: Any) -> None:
    with pytest.raises(TypeError):
        clip_grad_norm({"g": grad}, 1.0)


# ----------------------------------------------------------------------------------------------
# property tests

SHAPES = st.lists(
    hnp.array_shapes(min_dims=0, max_dims=3, min_side=1, max_side=12), min_size=1, max_size=5
)
P_VALUES = st.one_of(
    st.sampled_from([2.0, 1.0, INF, 3.0]), st.floats(min_value=0.25, max_value=8.0)
)


@settings(max_examples=150, deadline=None)
@given(
    shapes=SHAPES,
    seed=st.integers(0, 2**32 - 1),
    log_scale=st.floats(-12, 12),
    max_norm=st.floats(min_value=1e-4, max_value=1e4),
    norm_type=P_VALUES,
)
def test_random_gradients_match_torch(
    shapes: list[tuple[int, ...]], seed: int, log_scale: float, max_norm: float, norm_type: float
) -> None:
    grads = make_grads(shapes, seed, scale=math.exp(log_scale))
    check_against_torch(grads, max_norm, norm_type)


@settings(max_examples=100, deadline=None)
@given(
    values=hnp.arrays(
        F32, st.integers(1, 80), elements=st.floats(-1e6, 1e6, width=32, allow_subnormal=True)
    ),
    norm_type=P_VALUES,
)
def test_random_values_per_tensor_norm_match_torch(values: np.ndarray, norm_type: float) -> None:
    expected = F32(torch.linalg.vector_norm(torch.from_numpy(values), norm_type).item())
    assert ulps(tensor_norm(values, norm_type), expected) <= 1
