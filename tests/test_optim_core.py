"""The optimizer core's contract beyond numerics: validation, defaults, skip and reject rules."""

from __future__ import annotations

import math
import tracemalloc

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from optserve.optim import (
    GradientError,
    HyperparameterError,
    NonFiniteGradientError,
    algorithm_names,
    get_algorithm,
)
from optserve.optim.update import apply_update, initial_states

from .torch_reference import TORCH_CLASSES, TorchRun, ulps


def test_every_algorithm_named_in_the_issue_is_registered():
    assert set(algorithm_names()) == {
        "sgd",
        "adam",
        "adamw",
        "rmsprop",
        "adagrad",
        "nadam",
        "radam",
        "adamax",
        "lion",
    }


@pytest.mark.parametrize("name", sorted(TORCH_CLASSES))
def test_defaults_equal_torch_defaults(name):
    """Our defaults are read from nowhere but must equal what torch's constructor fills in."""
    ours = get_algorithm(name).configure({})
    torch_group = TORCH_CLASSES[name]([torch.nn.Parameter(torch.zeros(1))]).param_groups[0]
    for key, value in ours.items():
        expected = torch_group[key]
        assert (tuple(expected) if isinstance(expected, tuple | list) else expected) == value, key
    if name == "adamw":
        assert torch_group["decoupled_weight_decay"] is True


@pytest.mark.parametrize(
    ("name", "options", "field"),
    [
        ("adam", {"lr": -1e-3}, "lr"),
        ("adam", {"betas": (1.0, 0.999)}, "betas[0]"),
        ("adam", {"betas": (0.9, -0.1)}, "betas[1]"),
        ("adam", {"eps": -1e-8}, "eps"),
        ("adam", {"weight_decay": -0.1}, "weight_decay"),
        ("sgd", {"momentum": -0.5}, "momentum"),
        ("sgd", {"nesterov": True}, "nesterov"),
        ("sgd", {"nesterov": True, "momentum": 0.9, "dampening": 0.1}, "nesterov"),
        ("rmsprop", {"alpha": -0.5}, "alpha"),
        ("adagrad", {"lr_decay": -1.0}, "lr_decay"),
        ("adagrad", {"initial_accumulator_value": -1.0}, "initial_accumulator_value"),
        ("nadam", {"momentum_decay": -1.0}, "momentum_decay"),
    ],
)
def test_invalid_values_rejected_like_torch(name, options, field):
    with pytest.raises(HyperparameterError) as caught:
        get_algorithm(name).configure(options)
    error = caught.value
    assert error.field == field
    assert error.code == "invalid_hyperparameter"
    assert field.split("[")[0] in str(error) and error.allowed
    with pytest.raises(ValueError):  # torch refuses the same values
        TORCH_CLASSES[name]([torch.nn.Parameter(torch.zeros(1))], **options)


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"lr": float("nan")}, "lr"),
        ({"lr": float("inf")}, "lr"),
        ({"lr": "0.1"}, "lr"),
        ({"lr": True}, "lr"),
        ({"amsgrad": 1}, "amsgrad"),
        ({"betas": [0.9]}, "betas"),
        ({"betas": 0.9}, "betas"),
        ({"momentum": 0.9}, "momentum"),  # an SGD option, unknown to Adam
        ({"foreach": True}, "foreach"),  # torch execution flags are not hyperparameters here
    ],
)
def test_malformed_values_and_unknown_options(options, field):
    with pytest.raises(HyperparameterError) as caught:
        get_algorithm("adam").configure(options)
    assert caught.value.field == field


def test_unknown_optimizer_has_its_own_code():
    with pytest.raises(HyperparameterError) as caught:
        get_algorithm("adamm")
    assert caught.value.code == "unknown_optimizer"
    assert caught.value.field == "name"
    assert "adam" in caught.value.allowed
    assert get_algorithm("Adam").name == "adam"  # torch class names work too


def _session(name="adam", **options):
    algorithm = get_algorithm(name)
    hp = algorithm.configure(options)
    rng = np.random.default_rng(0)
    params = {"w": rng.standard_normal((3, 4)).astype(np.float32), "b": np.ones(4, np.float32)}
    states = initial_states(algorithm, hp, params)
    apply_update(algorithm, hp, params, {"w": np.ones((3, 4), np.float32)}, states, hp["lr"])
    return algorithm, hp, params, states


def _snapshot(params, states):
    arrays = {f"p:{k}": v.tobytes() for k, v in params.items()}
    for name, state in states.items():
        arrays.update({f"s:{name}:{k}": np.asarray(v).tobytes() for k, v in state.items()})
    return arrays


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_gradient_rejected_before_any_change(bad):
    algorithm, hp, params, states = _session()
    before = _snapshot(params, states)
    grad_b = np.ones(4, np.float32)
    grad_b[2] = bad
    grads = {"w": np.ones((3, 4), np.float32), "b": grad_b}
    with pytest.raises(NonFiniteGradientError) as caught:
        apply_update(algorithm, hp, params, grads, states, hp["lr"])
    assert caught.value.tensors == ["b"]
    assert caught.value.code == "non_finite"
    assert _snapshot(params, states) == before


@pytest.mark.parametrize(
    ("grads", "code"),
    [
        ({"w": np.ones((3, 4), np.float32), "nope": np.ones(1, np.float32)}, "unknown_tensor"),
        ({"w": np.ones((4, 3), np.float32)}, "shape_mismatch"),
        ({"w": np.ones((3, 4), np.float32), "b": np.ones(5, np.float32)}, "shape_mismatch"),
    ],
)
def test_bad_gradient_rejected_before_any_change(grads, code):
    algorithm, hp, params, states = _session()
    before = _snapshot(params, states)
    with pytest.raises(GradientError) as caught:
        apply_update(algorithm, hp, params, grads, states, hp["lr"])
    assert caught.value.code == code
    assert _snapshot(params, states) == before


def test_absent_tensor_is_skipped_and_steps_are_per_tensor():
    algorithm, hp, params, states = _session("adam", weight_decay=0.1)
    b_before = params["b"].copy()
    assert "b" not in states  # lazy state: no gradient yet, no state
    apply_update(algorithm, hp, params, {"w": np.zeros((3, 4), np.float32)}, states, hp["lr"])
    np.testing.assert_array_equal(params["b"], b_before)  # no decay without a gradient
    assert float(states["w"]["step"]) == 2.0
    apply_update(algorithm, hp, params, {"b": np.zeros(4, np.float32)}, states, hp["lr"])
    assert float(states["b"]["step"]) == 1.0 and float(states["w"]["step"]) == 2.0
    assert not np.array_equal(params["b"], b_before)  # a zero gradient is a real step (decay)


def test_adagrad_state_is_eager_like_torch():
    algorithm = get_algorithm("adagrad")
    hp = algorithm.configure({"initial_accumulator_value": 0.5})
    states = initial_states(algorithm, hp, {"w": np.zeros(3, np.float32)})
    assert float(states["w"]["step"]) == 0.0
    np.testing.assert_array_equal(states["w"]["sum"], np.full(3, 0.5, np.float32))


def test_step_counter_saturates_at_2_pow_24_like_torch():
    params = {"w": np.linspace(-1, 1, 8, dtype=np.float32)}
    reference = TorchRun("adagrad", params, {"lr_decay": 0.1})
    reference.step({"w": np.ones(8, np.float32)})
    torch_state = reference.optimizer.state[reference.tensors[0]]
    torch_state["step"].fill_(2.0**24)
    algorithm = get_algorithm("adagrad")
    hp = algorithm.configure({"lr_decay": 0.1})
    ours = {"w": params["w"].copy()}
    states = initial_states(algorithm, hp, ours)
    apply_update(algorithm, hp, ours, {"w": np.ones(8, np.float32)}, states, hp["lr"])
    states["w"]["step"] = np.float32(2.0**24)
    grad = np.full(8, 0.5, np.float32)
    reference.step({"w": grad})
    apply_update(algorithm, hp, ours, {"w": grad.copy()}, states, hp["lr"])
    assert float(states["w"]["step"]) == torch_state["step"].item() == 2.0**24
    assert ulps(ours["w"], reference.params()["w"], params["w"]).max() <= 4


def test_no_allocation_grows_with_the_number_of_steps():
    algorithm = get_algorithm("adam")
    hp = algorithm.configure({"amsgrad": True})
    params = {"w": np.zeros(100_000, np.float32)}
    states = initial_states(algorithm, hp, params)
    grad = np.ones(100_000, np.float32)
    for _ in range(5):
        apply_update(algorithm, hp, params, {"w": grad}, states, hp["lr"])
    tracemalloc.start()
    apply_update(algorithm, hp, params, {"w": grad}, states, hp["lr"])
    after_one = tracemalloc.get_traced_memory()[0]
    for _ in range(200):
        apply_update(algorithm, hp, params, {"w": grad}, states, hp["lr"])
    after_many = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    assert after_many - after_one < 16_384  # bytes: nothing proportional to steps or elements


# -- properties --------------------------------------------------------------------------------

OPTION_STRATEGIES = {
    "sgd": st.fixed_dictionaries(
        {"lr": st.floats(0, 0.5), "weight_decay": st.floats(0, 0.1), "maximize": st.booleans()},
        optional={"momentum": st.floats(0.1, 0.99), "dampening": st.floats(0, 0.5)},
    ),
    "adam": st.fixed_dictionaries(
        {
            "lr": st.floats(0, 0.1),
            "betas": st.tuples(st.floats(0, 0.99), st.floats(0, 0.9999)),
            "eps": st.floats(1e-10, 1e-3),
            "weight_decay": st.floats(0, 0.1),
            "amsgrad": st.booleans(),
            "maximize": st.booleans(),
            "decoupled_weight_decay": st.booleans(),
        }
    ),
    "rmsprop": st.fixed_dictionaries(
        {
            "lr": st.floats(0, 0.1),
            "alpha": st.floats(0.5, 0.999),
            "eps": st.floats(1e-10, 1e-3),
            "momentum": st.floats(0, 0.9),
            "weight_decay": st.floats(0, 0.1),
            "maximize": st.booleans(),
        }
    ),
    "adagrad": st.fixed_dictionaries(
        {
            "lr": st.floats(0, 0.5),
            "lr_decay": st.floats(0, 0.1),
            "initial_accumulator_value": st.floats(0, 1),
            "eps": st.floats(1e-10, 1e-3),
            "weight_decay": st.floats(0, 0.1),
        }
    ),
}

finite_grads = st.floats(-1e3, 1e3, allow_nan=False, width=32)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), name=st.sampled_from(sorted(OPTION_STRATEGIES)))
def test_property_random_shapes_values_and_options_match_torch(data, name):
    options = data.draw(OPTION_STRATEGIES[name])
    shape = data.draw(hnp.array_shapes(min_dims=0, max_dims=3, max_side=5))
    initial = data.draw(hnp.arrays(np.float32, shape, elements=finite_grads))
    grads = [data.draw(hnp.arrays(np.float32, shape, elements=finite_grads)) for _ in range(4)]
    reference = TorchRun(name, {"w": initial}, options)
    algorithm = get_algorithm(name)
    hp = algorithm.configure(options)
    params = {"w": initial.copy()}
    states = initial_states(algorithm, hp, params)
    for grad in grads:
        reference.step({"w": grad})
        apply_update(algorithm, hp, params, {"w": grad.copy()}, states, hp["lr"])
    expected = reference.params()["w"]
    assert ulps(params["w"], expected, initial, reference.max_move["w"]).max() <= 4


@given(value=st.floats(allow_nan=True, allow_infinity=True))
def test_property_lr_validation_accepts_exactly_finite_non_negative(value):
    valid = math.isfinite(value) and value >= 0
    try:
        get_algorithm("sgd").configure({"lr": value})
    except HyperparameterError:
        assert not valid
    else:
        assert valid


@pytest.mark.parametrize("max_norm", [0.5, 1e3])
def test_update_with_clipping_matches_torch_clip_then_step(max_norm):
    """clip_grad_norm_ over all tensors of the update, then the step: as a torch loop does it."""
    rng = np.random.default_rng(7)
    initial = {
        "a": rng.standard_normal((4, 5)).astype(np.float32),
        "b": rng.standard_normal(3).astype(np.float32),
        "c": np.asarray(rng.standard_normal(()), dtype=np.float32),
    }
    reference = TorchRun("adam", initial, {"lr": 0.01})
    algorithm = get_algorithm("adam")
    hp = algorithm.configure({"lr": 0.01})
    params = {n: a.copy() for n, a in initial.items()}
    states = initial_states(algorithm, hp, params)
    for step in range(10):
        grads = {
            n: np.asarray(rng.standard_normal(a.shape) * 3, dtype=np.float32)
            for n, a in initial.items()
        }
        if step % 2:
            del grads["b"]  # clipping covers only the tensors that have a gradient
        present = [t for n, t in zip(reference.names, reference.tensors, strict=True) if n in grads]
        for name, tensor in zip(reference.names, reference.tensors, strict=True):
            tensor.grad = torch.from_numpy(grads[name].copy()) if name in grads else None
        torch_norm = torch.nn.utils.clip_grad_norm_(present, max_norm)
        reference.optimizer.step()
        # Pushed in a different order than the parameters: the norm must not depend on it.
        shuffled = dict(reversed(list(grads.items())))
        result = apply_update(algorithm, hp, params, shuffled, states, hp["lr"], max_norm=max_norm)
        assert result.total_norm == torch_norm.item()
    for name in initial:
        expected = reference.tensors[reference.names.index(name)].detach().numpy()
        assert ulps(params[name], expected, initial[name]).max() <= 4


@pytest.mark.parametrize("where", [0, 2_999_999])
def test_non_finite_found_anywhere_in_a_large_gradient(where):
    """Above the parallel threshold the check is split across threads: every part counts."""
    algorithm = get_algorithm("sgd")
    hp = algorithm.configure({"lr": 0.1})
    params = {"w": np.zeros(3_000_000, np.float32)}
    grad = np.ones(3_000_000, np.float32)
    grad[where] = np.nan
    with pytest.raises(NonFiniteGradientError):
        apply_update(algorithm, hp, params, {"w": grad}, {}, hp["lr"])
    assert not params["w"].any()
