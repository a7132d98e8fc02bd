"""LR schedules against real torch.optim.lr_scheduler runs (the oracle; no stored numbers).

Each comparison drives a torch optimizer the way a training loop does (`optimizer.step()` then
`scheduler.step()`) and records the lr every `optimizer.step()` used; ours must match to 1e-12 and,
because we replay torch's float64 operations in order, is expected to match exactly.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.optim import lr_scheduler as sched

from optserve.optim.errors import HyperparameterError
from optserve.optim.schedules import Schedule, ScheduleState, make_schedule

EPOCHS = 300
TOL = 1e-12

TORCH_TYPES: dict[str, Callable[..., sched.LRScheduler]] = {
    "constant": sched.ConstantLR,
    "step": sched.StepLR,
    "multistep": sched.MultiStepLR,
    "exponential": sched.ExponentialLR,
    "cosine": sched.CosineAnnealingLR,
    "linear": sched.LinearLR,
}

WARMUP_COSINE = {
    "type": "sequence",
    "schedules": [
        {"type": "linear", "start_factor": 0.1, "total_iters": 5},
        {"type": "cosine", "T_max": 10},
    ],
    "milestones": [5],
}

# (id, spec, base lr). Defaults, non-defaults and torch's corner cases.
CASES: list[tuple[str, dict[str, Any] | None, float]] = [
    ("none", None, 0.1),
    ("constant-default", {"type": "constant"}, 0.1),
    ("constant", {"type": "constant", "factor": 0.5, "total_iters": 3}, 0.37),
    ("constant-total0", {"type": "constant", "factor": 0.25, "total_iters": 0}, 0.1),
    ("constant-factor1", {"type": "constant", "factor": 1.0, "total_iters": 4}, 1e-3),
    ("step", {"type": "step", "step_size": 7}, 0.1),
    ("step-1", {"type": "step", "step_size": 1, "gamma": 0.97}, 0.3),
    ("step-gamma", {"type": "step", "step_size": 30, "gamma": 0.5}, 1e-3),
    ("multistep", {"type": "multistep", "milestones": [30, 80]}, 0.1),
    ("multistep-dup", {"type": "multistep", "milestones": [10, 10, 50], "gamma": 0.3}, 0.1),
    ("multistep-zero", {"type": "multistep", "milestones": [0, 5], "gamma": 0.5}, 0.1),
    ("multistep-unsorted", {"type": "multistep", "milestones": [100, 20], "gamma": 0.7}, 0.2),
    ("exponential", {"type": "exponential", "gamma": 0.99}, 0.1),
    ("exponential-fast", {"type": "exponential", "gamma": 0.9}, 1e-3),
    ("exponential-grow", {"type": "exponential", "gamma": 1.01}, 1e-4),
    ("cosine", {"type": "cosine", "T_max": 10}, 0.1),
    ("cosine-eta", {"type": "cosine", "T_max": 100, "eta_min": 1e-4}, 0.1),
    ("cosine-1", {"type": "cosine", "T_max": 1}, 0.1),
    ("cosine-odd", {"type": "cosine", "T_max": 7, "eta_min": 0.03}, 0.3),
    ("cosine-eta-above", {"type": "cosine", "T_max": 13, "eta_min": 0.3}, 0.1),
    ("linear-default", {"type": "linear"}, 0.1),
    ("linear-warmup", {"type": "linear", "start_factor": 0.1, "total_iters": 5}, 0.1),
    (
        "linear-decay",
        {"type": "linear", "start_factor": 1.0, "end_factor": 0.0, "total_iters": 20},
        0.3,
    ),
    (
        "linear-mid",
        {"type": "linear", "start_factor": 0.25, "end_factor": 0.75, "total_iters": 10},
        1e-3,
    ),
    ("warmup-cosine", WARMUP_COSINE, 0.1),
    (
        "warmup-cosine-long",
        {
            "type": "sequence",
            "schedules": [
                {"type": "linear", "start_factor": 0.01, "total_iters": 20},
                {"type": "cosine", "T_max": 280, "eta_min": 1e-5},
            ],
            "milestones": [20],
        },
        3e-4,
    ),
    (
        "sequence-3",
        {
            "type": "sequence",
            "schedules": [
                {"type": "linear", "start_factor": 0.1, "total_iters": 5},
                {"type": "constant", "factor": 0.5, "total_iters": 10},
                {"type": "cosine", "T_max": 50, "eta_min": 1e-4},
            ],
            "milestones": [5, 40],
        },
        0.1,
    ),
    (
        "sequence-3-decays",
        {
            "type": "sequence",
            "schedules": [
                {"type": "exponential", "gamma": 0.95},
                {"type": "step", "step_size": 3},
                {"type": "multistep", "milestones": [0, 2, 4], "gamma": 0.5},
            ],
            "milestones": [10, 20],
        },
        0.1,
    ),
    # The cosine restart is its closed form: 0.03 + (0.3 - 0.03) != 0.3 in float64.
    (
        "sequence-cosine-restart",
        {
            "type": "sequence",
            "schedules": [
                {"type": "step", "step_size": 2},
                {"type": "cosine", "T_max": 20, "eta_min": 0.03},
            ],
            "milestones": [7],
        },
        0.3,
    ),
    (
        "sequence-cosine-first",
        {
            "type": "sequence",
            "schedules": [{"type": "cosine", "T_max": 8}, {"type": "linear"}],
            "milestones": [12],
        },
        0.1,
    ),
    (
        "sequence-single",
        {
            "type": "sequence",
            "schedules": [{"type": "exponential", "gamma": 0.98}],
            "milestones": [],
        },
        0.1,
    ),
]


# ----------------------------------------------------------------------------------------------
# torch side


def torch_scheduler(opt: torch.optim.Optimizer, spec: Mapping[str, Any]) -> sched.LRScheduler:
    """The torch scheduler a spec describes, built on `opt` the way a user would."""
    kwargs = {key: value for key, value in spec.items() if key != "type"}
    if spec["type"] == "sequence":
        subs = [torch_scheduler(opt, sub) for sub in kwargs["schedules"]]
        return sched.SequentialLR(opt, subs, milestones=list(kwargs["milestones"]))
    return TORCH_TYPES[spec["type"]](opt, **kwargs)


class TorchRun:
    """A one-parameter SGD model plus scheduler; `lr` is what the next optimizer.step() uses."""

    def __init__(self, spec: Mapping[str, Any] | None, base_lr: float) -> None:
        self.param = torch.nn.Parameter(torch.zeros(1))
        self.param.grad = torch.zeros(1)
        self.opt = torch.optim.SGD([self.param], lr=base_lr)
        self.scheduler = None if spec is None else torch_scheduler(self.opt, spec)

    @property
    def lr(self) -> float:
        return self.opt.param_groups[0]["lr"]

    def set_lr(self, lr: float) -> None:
        self.opt.param_groups[0]["lr"] = lr

    def update(self) -> float:
        """One training-loop iteration; returns the lr its optimizer.step() used."""
        used = self.lr
        self.opt.step()
        if self.scheduler is not None:
            self.scheduler.step()
        return used


def torch_lrs(spec: Mapping[str, Any] | None, base_lr: float, epochs: int) -> list[float]:
    run = TorchRun(spec, base_lr)
    return [run.update() for _ in range(epochs)]


# ----------------------------------------------------------------------------------------------
# our side


def our_lrs(schedule: Schedule, state: ScheduleState, epochs: int) -> list[float]:
    """The lr of each of the next `epochs` updates, advancing after each like scheduler.step()."""
    lrs = []
    for _ in range(epochs):
        lrs.append(state.lr)
        state = schedule.advance(state)
    return lrs


def compare(ours: list[float], theirs: list[float]) -> int:
    """Assert |diff| <= TOL everywhere; return how many were bit-identical."""
    assert len(ours) == len(theirs)
    for epoch, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        assert abs(a - b) <= TOL, f"epoch {epoch}: ours {a!r} torch {b!r}"
    return sum(a == b for a, b in zip(ours, theirs, strict=True))


# ----------------------------------------------------------------------------------------------
# parity over whole runs


@pytest.mark.parametrize(("spec", "base_lr"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_matches_torch_for_300_epochs(spec: dict[str, Any] | None, base_lr: float) -> None:
    schedule = make_schedule(spec)
    exact = compare(
        our_lrs(schedule, schedule.start(base_lr), EPOCHS), torch_lrs(spec, base_lr, EPOCHS)
    )
    assert exact == EPOCHS, f"only {exact}/{EPOCHS} lrs bit-identical"


def test_exact_equality_rate_over_all_cases(capsys: pytest.CaptureFixture[str]) -> None:
    """The headline number: fraction of all compared lrs that are bit-identical to torch."""
    exact = total = 0
    for _, spec, base_lr in CASES:
        schedule = make_schedule(spec)
        exact += compare(
            our_lrs(schedule, schedule.start(base_lr), EPOCHS), torch_lrs(spec, base_lr, EPOCHS)
        )
        total += EPOCHS
    with capsys.disabled():
        print(f"\nschedules: {exact}/{total} lrs bit-identical to torch ({exact / total:.2%})")
    assert exact == total


def test_warmup_cosine_known_shape() -> None:
    """Sanity on the documented warm-up + cosine run (values from torch, shape checked here)."""
    schedule = make_schedule(WARMUP_COSINE)
    lrs = our_lrs(schedule, schedule.start(0.1), 16)
    assert lrs == torch_lrs(WARMUP_COSINE, 0.1, 16)
    assert lrs[0] == pytest.approx(0.01)
    assert lrs[5] == 0.1  # milestone: the cosine restarts at its closed form, here exactly base
    assert lrs[15] == pytest.approx(0.0, abs=1e-17)


def test_cosine_keeps_following_the_cosine_past_t_max() -> None:
    schedule = make_schedule({"type": "cosine", "T_max": 100})
    lrs = our_lrs(schedule, schedule.start(0.1), 201)
    assert lrs[100] == pytest.approx(0.0, abs=1e-15)
    assert lrs[200] == pytest.approx(0.1)


# ----------------------------------------------------------------------------------------------
# state: serialisation, user-set lr, O(1) advance


@pytest.mark.parametrize(
    "case",
    [
        "cosine-odd",
        "warmup-cosine",
        "sequence-3",
        "multistep-dup",
        "linear-decay",
        "sequence-3-decays",
    ],
)
@pytest.mark.parametrize("stop", [0, 3, 5, 38, 40, 41, 137])
def test_state_round_trips_mid_run(case: str, stop: int) -> None:
    _, spec, base_lr = next(c for c in CASES if c[0] == case)
    schedule = make_schedule(spec)
    state = schedule.start(base_lr)
    for _ in range(stop):
        state = schedule.advance(state)
    restored = ScheduleState.from_dict(json.loads(json.dumps(state.to_dict())))
    assert restored == state
    resumed = make_schedule(json.loads(json.dumps(schedule.to_json())))
    assert resumed == schedule
    full = torch_lrs(spec, base_lr, stop + 120)
    assert our_lrs(resumed, restored, 120) == full[stop:]


@pytest.mark.parametrize(
    "case",
    [
        "exponential",
        "cosine-eta",
        "step",
        "linear-warmup",
        "constant",
        "warmup-cosine",
        "sequence-3",
        "none",
    ],
)
@pytest.mark.parametrize("at", [0, 2, 4, 5, 39, 40, 60])
def test_with_lr_mid_run_matches_torch_group_lr(case: str, at: int) -> None:
    """torch is chainable: after `group['lr'] = x` the next steps rescale x."""
    _, spec, base_lr = next(c for c in CASES if c[0] == case)
    schedule = make_schedule(spec)
    state = schedule.start(base_lr)
    run = TorchRun(spec, base_lr)
    ours: list[float] = []
    theirs: list[float] = []
    for epoch in range(150):
        if epoch == at:
            state = state.with_lr(0.0123)
            run.set_lr(0.0123)
        ours.append(state.lr)
        theirs.append(run.update())
        state = schedule.advance(state)
    assert ours == theirs


@pytest.mark.parametrize(
    "spec",
    [
        {"type": "cosine", "T_max": 977, "eta_min": 1e-5},
        {"type": "exponential", "gamma": 0.999999},
        {"type": "step", "step_size": 1000},
        {"type": "linear", "start_factor": 0.5, "total_iters": 3},
        {"type": "multistep", "milestones": [10**9 + 7, 10**9 + 7, 10**9 + 20]},
    ],
)
def test_advance_from_a_late_epoch_matches_torch(spec: dict[str, Any]) -> None:
    """advance() reads only the state, so resuming at epoch 1e9 costs nothing and stays exact."""
    epoch, lr = 10**9, 0.0042
    run = TorchRun(spec, 0.1)
    assert run.scheduler is not None
    run.scheduler.last_epoch = epoch
    run.set_lr(lr)
    schedule = make_schedule(spec)
    state = ScheduleState(last_epoch=epoch, lr=lr, base_lr=0.1)
    assert our_lrs(schedule, state, 60) == [run.update() for _ in range(60)]


def test_start_is_the_state_after_the_torch_constructor() -> None:
    schedule = make_schedule({"type": "linear", "start_factor": 0.1, "total_iters": 5})
    state = schedule.start(0.1)
    run = TorchRun(schedule.to_json(), 0.1)
    assert run.scheduler is not None
    assert (state.last_epoch, state.lr) == (run.scheduler.last_epoch, run.lr)
    assert state.base_lr == run.opt.param_groups[0]["initial_lr"]


def test_state_to_dict_is_json_and_exact() -> None:
    state = ScheduleState(last_epoch=12, lr=0.1 * 0.9**12, base_lr=1 / 3)
    data = state.to_dict()
    assert data == {"last_epoch": 12, "lr": 0.1 * 0.9**12, "base_lr": 1 / 3}
    assert ScheduleState.from_dict(json.loads(json.dumps(data))) == state


def test_none_schedule_never_changes_lr() -> None:
    schedule = make_schedule(None)
    assert schedule.to_json() == {"type": "none"}
    assert make_schedule({"type": "none"}) == schedule
    state = schedule.start(0.5)
    for _ in range(10):
        state = schedule.advance(state)
    assert (state.lr, state.last_epoch) == (0.5, 10)


def test_to_json_fills_torch_defaults() -> None:
    assert make_schedule({"type": "linear"}).to_json() == {
        "type": "linear",
        "start_factor": 1 / 3,
        "end_factor": 1.0,
        "total_iters": 5,
    }
    assert make_schedule({"type": "constant"}).to_json() == {
        "type": "constant",
        "factor": 1 / 3,
        "total_iters": 5,
    }
    assert make_schedule({"type": "step", "step_size": 3}).to_json() == {
        "type": "step",
        "step_size": 3,
        "gamma": 0.1,
    }
    assert make_schedule({"type": "multistep", "milestones": [9, 2, 9]}).to_json() == {
        "type": "multistep",
        "milestones": [2, 9, 9],
        "gamma": 0.1,
    }
    assert make_schedule({"type": "cosine", "T_max": 4}).to_json() == {
        "type": "cosine",
        "T_max": 4,
        "eta_min": 0.0,
    }
    assert make_schedule(WARMUP_COSINE).to_json()["schedules"][1] == {
        "type": "cosine",
        "T_max": 10,
        "eta_min": 0.0,
    }


# ----------------------------------------------------------------------------------------------
# validation


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({}, "lr_schedule.type"),
        ({"type": "warmup"}, "lr_schedule.type"),
        ({"type": "step"}, "lr_schedule.step_size"),
        ({"type": "step", "step_size": 0}, "lr_schedule.step_size"),
        ({"type": "step", "step_size": 2.0}, "lr_schedule.step_size"),
        ({"type": "step", "step_size": True}, "lr_schedule.step_size"),
        ({"type": "step", "step_size": 2, "gamma": -0.1}, "lr_schedule.gamma"),
        ({"type": "step", "step_size": 2, "gamma": math.nan}, "lr_schedule.gamma"),
        ({"type": "step", "step_size": 2, "gama": 0.5}, "lr_schedule.gama"),
        ({"type": "exponential"}, "lr_schedule.gamma"),
        ({"type": "exponential", "gamma": "0.9"}, "lr_schedule.gamma"),
        ({"type": "exponential", "gamma": math.inf}, "lr_schedule.gamma"),
        ({"type": "multistep", "milestones": [3, -1]}, "lr_schedule.milestones"),
        ({"type": "multistep", "milestones": 3}, "lr_schedule.milestones"),
        ({"type": "multistep"}, "lr_schedule.milestones"),
        ({"type": "cosine", "T_max": 0}, "lr_schedule.T_max"),
        ({"type": "cosine", "T_max": 10, "eta_min": -1e-3}, "lr_schedule.eta_min"),
        ({"type": "cosine", "T_max": 2**60}, "lr_schedule.T_max"),
        ({"type": "linear", "start_factor": 0.0}, "lr_schedule.start_factor"),
        ({"type": "linear", "start_factor": 1.5}, "lr_schedule.start_factor"),
        ({"type": "linear", "end_factor": 1.01}, "lr_schedule.end_factor"),
        ({"type": "linear", "total_iters": 0}, "lr_schedule.total_iters"),
        ({"type": "constant", "factor": 0}, "lr_schedule.factor"),
        ({"type": "constant", "factor": 2}, "lr_schedule.factor"),
        ({"type": "constant", "factor": 1e-310}, "lr_schedule.factor"),
        ({"type": "constant", "total_iters": -1}, "lr_schedule.total_iters"),
        ({"type": "none", "gamma": 0.5}, "lr_schedule.gamma"),
        ({"type": "sequence", "schedules": [], "milestones": []}, "lr_schedule.schedules"),
        (
            {
                "type": "sequence",
                "schedules": [{"type": "linear"}, {"type": "cosine", "T_max": 5}],
                "milestones": [],
            },
            "lr_schedule.milestones",
        ),
        (
            {
                "type": "sequence",
                "schedules": [{"type": "linear"}, {"type": "linear"}, {"type": "linear"}],
                "milestones": [5, 5],
            },
            "lr_schedule.milestones",
        ),
        (
            {
                "type": "sequence",
                "schedules": [{"type": "linear"}, {"type": "linear"}],
                "milestones": [0],
            },
            "lr_schedule.milestones",
        ),
        (
            {
                "type": "sequence",
                "schedules": [{"type": "linear"}, {"type": "sequence"}],
                "milestones": [3],
            },
            "lr_schedule.schedules[1].type",
        ),
        (
            {"type": "sequence", "schedules": [{"type": "none"}], "milestones": []},
            "lr_schedule.schedules[0].type",
        ),
        (
            {
                "type": "sequence",
                "schedules": [{"type": "linear"}, {"type": "cosine"}],
                "milestones": [3],
            },
            "lr_schedule.schedules[1].T_max",
        ),
        (
            {"type": "sequence", "schedules": [{"type": "linear"}, 7], "milestones": [3]},
            "lr_schedule.schedules[1]",
        ),
        (
            {"type": "sequence", "schedules": [{"type": "linear"}], "milestones": [], "x": 1},
            "lr_schedule.x",
        ),
    ],
)
def test_invalid_specs_name_the_field(spec: dict[str, Any], field: str) -> None:
    with pytest.raises(HyperparameterError) as info:
        make_schedule(spec)
    assert info.value.field == field
    assert info.value.allowed


def test_not_a_mapping_is_rejected() -> None:
    with pytest.raises(HyperparameterError) as info:
        make_schedule(["linear"])  # type: ignore[arg-type]
    assert info.value.field == "lr_schedule"


@pytest.mark.parametrize("lr", [-0.1, math.nan, math.inf, "0.1", True])
def test_invalid_lr_is_rejected(lr: Any) -> None:
    schedule = make_schedule({"type": "exponential", "gamma": 0.9})
    with pytest.raises(HyperparameterError) as info:
        schedule.start(lr)
    assert info.value.field == "lr"
    with pytest.raises(HyperparameterError):
        schedule.start(0.1).with_lr(lr)


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"last_epoch": -1, "lr": 0.1, "base_lr": 0.1}, "lr_schedule_state.last_epoch"),
        ({"last_epoch": 1.0, "lr": 0.1, "base_lr": 0.1}, "lr_schedule_state.last_epoch"),
        ({"last_epoch": 1, "lr": None, "base_lr": 0.1}, "lr_schedule_state.lr"),
        ({"last_epoch": 1, "lr": 0.1}, "lr_schedule_state.base_lr"),
        ({"last_epoch": 1, "lr": 0.1, "base_lr": 0.1, "phase": 0}, "lr_schedule_state.phase"),
    ],
)
def test_invalid_state_dicts_are_rejected(data: dict[str, Any], field: str) -> None:
    with pytest.raises(HyperparameterError) as info:
        ScheduleState.from_dict(data)
    assert info.value.field == field


# ----------------------------------------------------------------------------------------------
# property tests: random valid parameters against torch

FACTORS = st.floats(min_value=1e-6, max_value=1.0)
GAMMAS = st.floats(min_value=0.0, max_value=1.2)
BASE_LRS = st.floats(min_value=1e-6, max_value=10.0)

SINGLE = st.one_of(
    st.fixed_dictionaries(
        {"type": st.just("constant")},
        optional={"factor": FACTORS, "total_iters": st.integers(0, 30)},
    ),
    st.fixed_dictionaries(
        {"type": st.just("step"), "step_size": st.integers(1, 30)}, optional={"gamma": GAMMAS}
    ),
    st.fixed_dictionaries(
        {"type": st.just("multistep"), "milestones": st.lists(st.integers(0, 60), max_size=6)},
        optional={"gamma": GAMMAS},
    ),
    st.fixed_dictionaries({"type": st.just("exponential"), "gamma": GAMMAS}),
    st.fixed_dictionaries(
        {"type": st.just("cosine"), "T_max": st.integers(1, 60)},
        optional={"eta_min": st.floats(min_value=0.0, max_value=0.5)},
    ),
    st.fixed_dictionaries(
        {"type": st.just("linear")},
        optional={
            "start_factor": FACTORS,
            "end_factor": st.floats(min_value=0.0, max_value=1.0),
            "total_iters": st.integers(1, 30),
        },
    ),
)


@st.composite
def sequences(draw: st.DrawFn) -> dict[str, Any]:
    schedules = draw(st.lists(SINGLE, min_size=1, max_size=4))
    milestones = sorted(
        draw(st.sets(st.integers(1, 90), min_size=len(schedules) - 1, max_size=len(schedules) - 1))
    )
    return {"type": "sequence", "schedules": schedules, "milestones": milestones}


@settings(max_examples=150, deadline=None)
@given(spec=SINGLE, base_lr=BASE_LRS)
def test_random_single_schedules_match_torch(spec: dict[str, Any], base_lr: float) -> None:
    schedule = make_schedule(spec)
    assert our_lrs(schedule, schedule.start(base_lr), 120) == torch_lrs(spec, base_lr, 120)


@settings(max_examples=100, deadline=None)
@given(spec=sequences(), base_lr=BASE_LRS)
def test_random_sequences_match_torch(spec: dict[str, Any], base_lr: float) -> None:
    schedule = make_schedule(spec)
    assert make_schedule(schedule.to_json()) == schedule
    assert our_lrs(schedule, schedule.start(base_lr), 120) == torch_lrs(spec, base_lr, 120)


@settings(max_examples=60, deadline=None)
@given(
    spec=st.one_of(SINGLE, sequences()),
    base_lr=BASE_LRS,
    stop=st.integers(0, 100),
    new_lr=st.floats(min_value=0.0, max_value=1.0),
)
def test_random_with_lr_and_resume_match_torch(
    spec: dict[str, Any], base_lr: float, stop: int, new_lr: float
) -> None:
    schedule = make_schedule(spec)
    state = schedule.start(base_lr)
    run = TorchRun(spec, base_lr)
    for _ in range(stop):
        run.update()
        state = schedule.advance(state)
    run.set_lr(new_lr)
    state = ScheduleState.from_dict(json.loads(json.dumps(state.with_lr(new_lr).to_dict())))
    assert our_lrs(schedule, state, 40) == [run.update() for _ in range(40)]
