"""Parity of every algorithm and option with torch.optim 2.13 (CPU), run inside the test.

Expectations come from torch at test time. Tolerances are DESIGN.md's: at most 4 ulp after 10
steps, rtol 1e-5 / atol 1e-6 after 1000 steps. Optimizers without sqrt (SGD, Adamax, Lion) must be
bit-identical: their kernels follow torch's rounding op for op.
"""

from __future__ import annotations

import numpy as np
import pytest

from optserve.optim import get_algorithm
from optserve.optim.update import apply_update, initial_states

from .torch_reference import TorchRun, ulps

SHAPES = {"scalar": (), "vec": (7,), "mat": (3, 4), "cube": (2, 3, 5)}

CONFIGS: list[tuple[str, dict]] = [
    ("sgd", {"lr": 0.1}),
    ("sgd", {"lr": 0.05, "momentum": 0.9}),
    ("sgd", {"lr": 0.05, "momentum": 0.9, "dampening": 0.3}),
    ("sgd", {"lr": 0.05, "momentum": 0.9, "nesterov": True}),
    ("sgd", {"lr": 0.1, "weight_decay": 0.01}),
    ("sgd", {"lr": 0.1, "maximize": True}),
    (
        "sgd",
        {"lr": 0.02, "momentum": 0.8, "nesterov": True, "weight_decay": 0.05, "maximize": True},
    ),
    ("adam", {}),
    ("adam", {"lr": 0.01, "betas": (0.8, 0.99), "eps": 1e-6}),
    ("adam", {"lr": 0.01, "amsgrad": True}),
    ("adam", {"lr": 0.01, "weight_decay": 0.1}),
    ("adam", {"lr": 0.01, "weight_decay": 0.1, "decoupled_weight_decay": True}),
    ("adam", {"lr": 0.01, "maximize": True}),
    ("adam", {"lr": 0.01, "amsgrad": True, "weight_decay": 0.05, "maximize": True}),
    ("adamw", {}),
    ("adamw", {"lr": 0.01, "weight_decay": 0.1, "amsgrad": True}),
    ("adamw", {"lr": 0.01, "betas": (0.5, 0.9), "eps": 1e-5, "maximize": True}),
    ("rmsprop", {}),
    ("rmsprop", {"lr": 0.001, "alpha": 0.9, "eps": 1e-6}),
    ("rmsprop", {"lr": 0.001, "centered": True}),
    ("rmsprop", {"lr": 0.001, "momentum": 0.5}),
    ("rmsprop", {"lr": 0.001, "weight_decay": 0.1}),
    ("rmsprop", {"lr": 0.001, "maximize": True}),
    (
        "rmsprop",
        {"lr": 0.001, "centered": True, "momentum": 0.9, "weight_decay": 0.01, "maximize": True},
    ),
    ("adagrad", {}),
    ("adagrad", {"lr": 0.05, "lr_decay": 0.01}),
    ("adagrad", {"lr": 0.05, "weight_decay": 0.1}),
    ("adagrad", {"lr": 0.05, "initial_accumulator_value": 0.1, "eps": 1e-8}),
    ("adagrad", {"lr": 0.05, "maximize": True}),
    (
        "adagrad",
        {
            "lr": 0.05,
            "lr_decay": 0.1,
            "weight_decay": 0.01,
            "initial_accumulator_value": 1.0,
            "maximize": True,
        },
    ),
    ("nadam", {}),
    ("nadam", {"lr": 0.01, "betas": (0.8, 0.99), "momentum_decay": 0.01, "eps": 1e-6}),
    ("nadam", {"lr": 0.01, "weight_decay": 0.1}),
    ("nadam", {"lr": 0.01, "weight_decay": 0.1, "decoupled_weight_decay": True}),
    ("nadam", {"lr": 0.01, "maximize": True}),
    ("radam", {}),
    ("radam", {"lr": 0.01, "betas": (0.8, 0.99), "eps": 1e-6}),
    ("radam", {"lr": 0.01, "weight_decay": 0.1}),
    ("radam", {"lr": 0.01, "weight_decay": 0.1, "decoupled_weight_decay": True}),
    ("radam", {"lr": 0.01, "maximize": True}),
    ("adamax", {}),
    ("adamax", {"lr": 0.01, "betas": (0.8, 0.99), "eps": 1e-6}),
    ("adamax", {"lr": 0.01, "weight_decay": 0.1}),
    ("adamax", {"lr": 0.01, "maximize": True}),
    ("lion", {}),
    ("lion", {"lr": 0.001, "betas": (0.8, 0.95)}),
    ("lion", {"lr": 0.001, "weight_decay": 0.1}),
    ("lion", {"lr": 0.001, "maximize": True}),
]

BIT_EXACT = {"sgd", "adamax", "lion"}


def _ids(config: tuple[str, dict]) -> str:
    name, options = config
    return name + "-" + ("-".join(f"{k}={v}" for k, v in options.items()) or "defaults")


def _gradients(rng: np.random.Generator, step: int) -> dict[str, np.ndarray | None]:
    """Random gradients with exact zeros; some tensors skipped on some steps, one all-zero."""
    grads: dict[str, np.ndarray | None] = {}
    for name, shape in SHAPES.items():
        grad = rng.standard_normal(shape).astype(np.float32) * np.float32(rng.uniform(0.01, 3))
        grad = np.where(rng.random(shape) < 0.1, np.float32(0), grad).astype(np.float32)
        grads[name] = grad
    if step % 3 == 1:
        grads["vec"] = None  # no gradient: no step, no decay
    if step % 4 == 2:
        grads["cube"] = None
    if step % 5 == 3:
        grads["mat"] = np.zeros(SHAPES["mat"], dtype=np.float32)  # a zero gradient is a real step
    return grads


def run_both(name: str, options: dict, steps: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    initial = {n: rng.standard_normal(s).astype(np.float32) for n, s in SHAPES.items()}
    reference = TorchRun(name, initial, options)
    algorithm = get_algorithm(name)
    hp = algorithm.configure(options)
    params = {n: a.copy() for n, a in initial.items()}
    states = initial_states(algorithm, hp, params)
    for step in range(steps):
        grads = _gradients(rng, step)
        reference.step(grads)
        present = {n: g.copy() for n, g in grads.items() if g is not None}
        apply_update(algorithm, hp, params, present, states, hp["lr"])
    return initial, params, states, reference


@pytest.mark.parametrize("config", CONFIGS, ids=_ids)
def test_ten_steps_within_4_ulp(config):
    name, options = config
    initial, params, states, reference = run_both(name, options, steps=10)
    expected = reference.params()
    for tensor in SHAPES:
        distance = ulps(
            params[tensor], expected[tensor], initial[tensor], reference.max_move[tensor]
        )
        assert distance.max() <= 4, f"{tensor}: {distance.max()} ulp"
        if name in BIT_EXACT:
            np.testing.assert_array_equal(params[tensor], expected[tensor])
        torch_state = reference.state(tensor)
        assert set(states.get(tensor, {})) == set(torch_state)
        for key, value in torch_state.items():
            ours = states[tensor][key]
            if np.ndim(value) == 0:
                assert float(ours) == value, key  # step and mu_product are exact float32
            else:
                scale = np.float32(np.abs(value).max())
                np.testing.assert_allclose(ours, value, rtol=1e-5, atol=1e-6 * scale + 1e-30)


@pytest.mark.parametrize("config", CONFIGS, ids=_ids)
def test_thousand_steps_close(config):
    name, options = config
    _, params, _, reference = run_both(name, options, steps=1000, seed=1)
    expected = reference.params()
    for tensor in SHAPES:
        if name in BIT_EXACT:
            np.testing.assert_array_equal(params[tensor], expected[tensor])
        else:
            np.testing.assert_allclose(params[tensor], expected[tensor], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["sgd", "adam", "rmsprop", "adagrad"])
def test_large_tensor_split_across_cores_matches_torch(name):
    """Tensors above the parallel threshold are split across threads; results must not change."""
    rng = np.random.default_rng(3)
    initial = {"w": rng.standard_normal(1_500_000).astype(np.float32)}
    options = {"lr": 0.01, "momentum": 0.9} if name == "sgd" else {"lr": 0.01}
    reference = TorchRun(name, initial, options)
    algorithm = get_algorithm(name)
    hp = algorithm.configure(options)
    params = {"w": initial["w"].copy()}
    states = initial_states(algorithm, hp, params)
    for _ in range(3):
        grad = rng.standard_normal(1_500_000).astype(np.float32)
        reference.step({"w": grad})
        apply_update(algorithm, hp, params, {"w": grad.copy()}, states, hp["lr"])
    distance = ulps(params["w"], reference.params()["w"], initial["w"], reference.max_move["w"])
    assert distance.max() <= 4
