"""Learning-rate schedules that reproduce `torch.optim.lr_scheduler` bit for bit (OPTIMIZERS.md §4).

torch's `scheduler.step()` is *chainable*: each `get_lr()` rescales the optimizer's current
`group["lr"]` in Python float64, so the value after k steps is a product of k roundings, not the
closed form. We replay exactly those float64 operations, in torch's order, one step at a time. This
keeps every lr equal to torch's, lets a user-set lr carry on like `group["lr"] = x` does in torch,
and makes `advance` O(1): a server steps a schedule once per update, millions of times.

A schedule is immutable and JSON-described (`make_schedule(spec)`, `Schedule.to_json()`); where it
stands lives in a separate `ScheduleState`, so the state can be stored per session and advanced
without re-validating the spec. `state.lr` after k-1 advances is the lr of the k-th update, as
torch's lr at `last_epoch = k-1` is the one the k-th `optimizer.step()` uses.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from bisect import bisect_left, bisect_right
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from itertools import pairwise
from typing import Any, ClassVar

from .errors import HyperparameterError

#: Field prefix of every error about a schedule spec (the API's request field).
FIELD = "lr_schedule"
#: Field prefix of every error about a stored schedule state.
STATE_FIELD = "lr_schedule_state"
#: Largest integer accepted anywhere: above 2**53 the int->float conversions torch performs in
#: `get_lr` stop being exact, and far above it Python raises OverflowError mid-run.
MAX_INT = 2**53
#: Longest milestone/schedule list accepted: bounds the size of a spec a client can make us store.
MAX_ITEMS = 10_000

#: Smallest start/constant factor: below it torch's `1.0 / factor` (or the LinearLR ratio)
#: overflows to inf, and inf * 0.0 turns the lr into NaN.
MIN_FACTOR = 1e-300

_NON_NEGATIVE = "a finite number >= 0"
_FACTOR = f"a number in [{MIN_FACTOR}, 1]"


# ----------------------------------------------------------------------------------------------
# State


@dataclass(frozen=True, slots=True)
class ScheduleState:
    """Where a schedule stands: torch's `last_epoch`, the current `group["lr"]` and `initial_lr`.

    Sequence bookkeeping (which sub-schedule runs, its own epoch) is derived from `last_epoch` and
    the milestones, so it cannot go out of sync with the stored state.
    """

    last_epoch: int
    lr: float
    base_lr: float

    def with_lr(self, lr: float) -> ScheduleState:
        """The state after the user sets the lr (`group["lr"] = lr`); later steps rescale it."""
        return replace(self, lr=_lr_value("lr", lr))

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form; json's float repr round-trips float64 exactly."""
        return {"last_epoch": self.last_epoch, "lr": self.lr, "base_lr": self.base_lr}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ScheduleState:
        """Inverse of `to_dict`; rejects anything `to_dict` cannot have produced."""
        if not isinstance(data, Mapping):
            raise HyperparameterError(STATE_FIELD, data, "an object")
        _check_keys(data, ("last_epoch", "lr", "base_lr"), STATE_FIELD)
        for key in ("last_epoch", "lr", "base_lr"):
            if key not in data:
                raise HyperparameterError(f"{STATE_FIELD}.{key}", None, "required")
        epoch = data["last_epoch"]
        if not _is_int(epoch) or not 0 <= epoch <= MAX_INT:
            raise HyperparameterError(
                f"{STATE_FIELD}.last_epoch", epoch, f"an integer in [0, {MAX_INT}]"
            )
        return cls(
            last_epoch=epoch,
            lr=_lr_value(f"{STATE_FIELD}.lr", data["lr"]),
            base_lr=_lr_value(f"{STATE_FIELD}.base_lr", data["base_lr"]),
        )


# ----------------------------------------------------------------------------------------------
# One torch scheduler each: the three ways torch computes an lr, without the optimizer.


class _Rule(ABC):
    """A torch scheduler's lr arithmetic, with the optimizer's `group["lr"]` passed in and out.

    torch computes a scheduler's lr three different ways, and all three are needed to be exact:
    `initial` is the constructor's step (`_is_initial`, epoch 0), `step` is `get_lr()` at an epoch
    >= 1, `restart` is the closed form at epoch 0 that SequentialLR uses at a milestone.
    """

    kind: ClassVar[str]

    @abstractmethod
    def initial(self, lr: float) -> float:
        """lr written by the constructor's initial step (epoch 0), from the group's lr."""

    @abstractmethod
    def step(self, lr: float, base: float, epoch: int) -> float:
        """lr written by `scheduler.step()` reaching `epoch` (>= 1), from the current lr."""

    @abstractmethod
    def restart(self, base: float) -> float:
        """`_get_closed_form_lr()` at epoch 0: SequentialLR's `_update_lr(0)` at a milestone."""

    @abstractmethod
    def params(self) -> dict[str, Any]:
        """The torch constructor arguments, defaults filled in."""

    def to_json(self) -> dict[str, Any]:
        """The normalized spec: `type` plus every parameter."""
        return {"type": self.kind, **self.params()}


@dataclass(frozen=True, slots=True)
class _Fixed(_Rule):
    """No scheduler at all: the lr only changes when the user sets it."""

    kind: ClassVar[str] = "none"

    def initial(self, lr: float) -> float:
        return lr

    def step(self, lr: float, base: float, epoch: int) -> float:
        return lr

    def restart(self, base: float) -> float:
        return base

    def params(self) -> dict[str, Any]:
        return {}


@dataclass(frozen=True, slots=True)
class _Constant(_Rule):
    """ConstantLR: lr*factor at epoch 0, divided back out (`* (1.0 / factor)`) at total_iters."""

    kind: ClassVar[str] = "constant"
    factor: float = 1.0 / 3
    total_iters: int = 5

    def initial(self, lr: float) -> float:
        return lr * self.factor

    def step(self, lr: float, base: float, epoch: int) -> float:
        if epoch != self.total_iters:
            return lr
        return lr * (1.0 / self.factor)

    def restart(self, base: float) -> float:
        # torch: base * (factor + (last_epoch >= total_iters) * (1 - factor)), last_epoch = 0.
        return base * (self.factor + (self.total_iters <= 0) * (1 - self.factor))

    def params(self) -> dict[str, Any]:
        return {"factor": self.factor, "total_iters": self.total_iters}


@dataclass(frozen=True, slots=True)
class _Step(_Rule):
    """StepLR: lr *= gamma at every non-zero multiple of step_size."""

    kind: ClassVar[str] = "step"
    step_size: int
    gamma: float = 0.1

    def initial(self, lr: float) -> float:
        return lr

    def step(self, lr: float, base: float, epoch: int) -> float:
        if epoch % self.step_size != 0:
            return lr
        return lr * self.gamma

    def restart(self, base: float) -> float:
        return base * self.gamma ** (0 // self.step_size)

    def params(self) -> dict[str, Any]:
        return {"step_size": self.step_size, "gamma": self.gamma}


@dataclass(frozen=True, slots=True)
class _MultiStep(_Rule):
    """MultiStepLR: lr *= gamma**n at an epoch listed n times (torch keeps a Counter)."""

    kind: ClassVar[str] = "multistep"
    milestones: tuple[int, ...] = ()  # sorted, duplicates kept
    gamma: float = 0.1

    def _times(self, epoch: int) -> int:
        return bisect_right(self.milestones, epoch) - bisect_left(self.milestones, epoch)

    def initial(self, lr: float) -> float:
        return self.step(lr, lr, 0)

    def step(self, lr: float, base: float, epoch: int) -> float:
        times = self._times(epoch)
        if times == 0:
            return lr
        return lr * self.gamma**times

    def restart(self, base: float) -> float:
        return base * self.gamma ** bisect_right(self.milestones, 0)

    def params(self) -> dict[str, Any]:
        return {"milestones": list(self.milestones), "gamma": self.gamma}


@dataclass(frozen=True, slots=True)
class _Exponential(_Rule):
    """ExponentialLR: lr *= gamma every step (the constructor's step leaves lr alone)."""

    kind: ClassVar[str] = "exponential"
    gamma: float

    def initial(self, lr: float) -> float:
        return lr

    def step(self, lr: float, base: float, epoch: int) -> float:
        return lr * self.gamma

    def restart(self, base: float) -> float:
        return base * self.gamma**0

    def params(self) -> dict[str, Any]:
        return {"gamma": self.gamma}


@dataclass(frozen=True, slots=True)
class _Cosine(_Rule):
    """CosineAnnealingLR's recursive form; not clamped at T_max, it follows the cosine back up."""

    kind: ClassVar[str] = "cosine"
    T_max: int
    eta_min: float = 0.0

    def initial(self, lr: float) -> float:
        return lr

    def step(self, lr: float, base: float, epoch: int) -> float:
        t_max, eta_min = self.T_max, self.eta_min
        if (epoch - 1 - t_max) % (2 * t_max) == 0:
            # The previous epoch sat at the trough (1 + cos = 0): the ratio form would divide by 0.
            return lr + (base - eta_min) * (1 - math.cos(math.pi / t_max)) / 2
        return (1 + math.cos(math.pi * epoch / t_max)) / (
            1 + math.cos(math.pi * (epoch - 1) / t_max)
        ) * (lr - eta_min) + eta_min

    def restart(self, base: float) -> float:
        # Not simply `base`: eta_min + (base - eta_min) can differ from base by one rounding.
        t_max, eta_min = self.T_max, self.eta_min
        return eta_min + (base - eta_min) * (1 + math.cos(math.pi * 0 / t_max)) / 2

    def params(self) -> dict[str, Any]:
        return {"T_max": self.T_max, "eta_min": self.eta_min}


@dataclass(frozen=True, slots=True)
class _Linear(_Rule):
    """LinearLR: factor moves linearly from start_factor to end_factor over total_iters steps."""

    kind: ClassVar[str] = "linear"
    start_factor: float = 1.0 / 3
    end_factor: float = 1.0
    total_iters: int = 5

    def initial(self, lr: float) -> float:
        return lr * self.start_factor

    def step(self, lr: float, base: float, epoch: int) -> float:
        if epoch > self.total_iters:
            return lr
        start, end = self.start_factor, self.end_factor
        return lr * (1.0 + (end - start) / (self.total_iters * start + (epoch - 1) * (end - start)))

    def restart(self, base: float) -> float:
        start, end, total = self.start_factor, self.end_factor, self.total_iters
        return base * (start + (end - start) * min(total, 0) / total)

    def params(self) -> dict[str, Any]:
        return {
            "start_factor": self.start_factor,
            "end_factor": self.end_factor,
            "total_iters": self.total_iters,
        }


# ----------------------------------------------------------------------------------------------
# Schedule


@dataclass(frozen=True, slots=True)
class Schedule:
    """An immutable lr schedule: one torch scheduler, or a SequentialLR of several.

    A single scheduler is kept as a one-phase sequence without milestones; torch's SequentialLR with
    one scheduler behaves exactly like that scheduler, so one code path serves both.
    """

    phases: tuple[_Rule, ...]
    milestones: tuple[int, ...] = ()
    sequential: bool = False

    def to_json(self) -> dict[str, Any]:
        """The normalized spec (defaults filled in); `make_schedule` accepts it back unchanged."""
        if not self.sequential:
            return self.phases[0].to_json()
        return {
            "type": "sequence",
            "schedules": [phase.to_json() for phase in self.phases],
            "milestones": list(self.milestones),
        }

    def start(self, base_lr: float) -> ScheduleState:
        """The state right after torch's scheduler constructor (last_epoch = 0) for this base lr."""
        base = _lr_value("lr", base_lr)
        return ScheduleState(last_epoch=0, lr=self.phases[0].initial(base), base_lr=base)

    def advance(self, state: ScheduleState) -> ScheduleState:
        """One `scheduler.step()`: O(1) in the number of steps taken so far."""
        epoch = state.last_epoch + 1
        phase = bisect_right(self.milestones, epoch)
        rule = self.phases[phase]
        if phase > 0 and self.milestones[phase - 1] == epoch:
            lr = rule.restart(state.base_lr)
        else:
            offset = self.milestones[phase - 1] if phase > 0 else 0
            lr = rule.step(state.lr, state.base_lr, epoch - offset)
        return replace(state, last_epoch=epoch, lr=lr)


# ----------------------------------------------------------------------------------------------
# Parsing and validation


def make_schedule(spec: Mapping[str, Any] | None) -> Schedule:
    """Validate a JSON schedule spec; None means no scheduler (the lr never changes by itself).

    Raises HyperparameterError naming the offending field, e.g. "lr_schedule.gamma".
    """
    if spec is None:
        return Schedule(phases=(_Fixed(),))
    rule_type = _type_of(spec, FIELD)
    if rule_type != "sequence":
        return Schedule(phases=(_parse_rule(spec, FIELD),))
    return _parse_sequence(spec)


def _parse_sequence(spec: Mapping[str, Any]) -> Schedule:
    """SequentialLR: sub-schedules (never nested) switched at strictly increasing milestones."""
    _check_keys(spec, ("type", "schedules", "milestones"), FIELD)
    items = _list(spec, "schedules", FIELD, min_len=1)
    phases = []
    for i, item in enumerate(items):
        prefix = f"{FIELD}.schedules[{i}]"
        if _type_of(item, prefix) in ("sequence", "none"):
            raise HyperparameterError(
                f"{prefix}.type", item["type"], f"one of {', '.join(_PHASE_TYPES)}"
            )
        phases.append(_parse_rule(item, prefix))
    milestones = _int_list(spec, "milestones", FIELD, minimum=1)
    if len(milestones) != len(phases) - 1:
        raise HyperparameterError(
            f"{FIELD}.milestones", list(milestones), f"exactly {len(phases) - 1} milestone(s)"
        )
    if any(a >= b for a, b in pairwise(milestones)):
        raise HyperparameterError(f"{FIELD}.milestones", list(milestones), "strictly increasing")
    return Schedule(phases=tuple(phases), milestones=milestones, sequential=True)


def _parse_rule(spec: Mapping[str, Any], prefix: str) -> _Rule:
    """One non-sequence spec; `prefix` names where it sits in the request."""
    rule_type = _type_of(spec, prefix)
    parse = _RULES[rule_type]
    return parse(spec, prefix)


def _parse_none(spec: Mapping[str, Any], prefix: str) -> _Rule:
    _check_keys(spec, ("type",), prefix)
    return _Fixed()


def _parse_constant(spec: Mapping[str, Any], prefix: str) -> _Rule:
    _check_keys(spec, ("type", "factor", "total_iters"), prefix)
    # factor 0 would make torch divide by zero at total_iters (see MIN_FACTOR).
    return _Constant(
        factor=_float(spec, "factor", prefix, 1.0 / 3, low=MIN_FACTOR, high=1.0, allowed=_FACTOR),
        total_iters=_int(spec, "total_iters", prefix, 5, minimum=0),
    )


def _parse_step(spec: Mapping[str, Any], prefix: str) -> _Rule:
    _check_keys(spec, ("type", "step_size", "gamma"), prefix)
    return _Step(
        step_size=_int(spec, "step_size", prefix, None, minimum=1),
        gamma=_float(spec, "gamma", prefix, 0.1),
    )


def _parse_multistep(spec: Mapping[str, Any], prefix: str) -> _Rule:
    _check_keys(spec, ("type", "milestones", "gamma"), prefix)
    return _MultiStep(
        milestones=tuple(sorted(_int_list(spec, "milestones", prefix, minimum=0))),
        gamma=_float(spec, "gamma", prefix, 0.1),
    )


def _parse_exponential(spec: Mapping[str, Any], prefix: str) -> _Rule:
    _check_keys(spec, ("type", "gamma"), prefix)
    return _Exponential(gamma=_float(spec, "gamma", prefix, None))


def _parse_cosine(spec: Mapping[str, Any], prefix: str) -> _Rule:
    _check_keys(spec, ("type", "T_max", "eta_min"), prefix)
    return _Cosine(
        T_max=_int(spec, "T_max", prefix, None, minimum=1),
        eta_min=_float(spec, "eta_min", prefix, 0.0),
    )


def _parse_linear(spec: Mapping[str, Any], prefix: str) -> _Rule:
    _check_keys(spec, ("type", "start_factor", "end_factor", "total_iters"), prefix)
    # total_iters 0 would divide by zero in torch's closed form (a SequentialLR restart).
    return _Linear(
        start_factor=_float(
            spec, "start_factor", prefix, 1.0 / 3, low=MIN_FACTOR, high=1.0, allowed=_FACTOR
        ),
        end_factor=_float(
            spec, "end_factor", prefix, 1.0, high=1.0, allowed="a finite number in [0, 1]"
        ),
        total_iters=_int(spec, "total_iters", prefix, 5, minimum=1),
    )


_RULES = {
    "none": _parse_none,
    "constant": _parse_constant,
    "step": _parse_step,
    "multistep": _parse_multistep,
    "exponential": _parse_exponential,
    "cosine": _parse_cosine,
    "linear": _parse_linear,
}
_TYPES = (*_RULES, "sequence")
#: What a sequence may contain: torch has no "no scheduler" scheduler, and no nesting here.
_PHASE_TYPES = tuple(kind for kind in _RULES if kind != "none")


def _type_of(spec: Any, prefix: str) -> str:
    """The spec's `type`, checked to be one we know."""
    if not isinstance(spec, Mapping):
        raise HyperparameterError(prefix, spec, "an object with a 'type'")
    rule_type = spec.get("type")
    if not isinstance(rule_type, str) or rule_type not in _TYPES:
        raise HyperparameterError(f"{prefix}.type", rule_type, f"one of {', '.join(_TYPES)}")
    return rule_type


def _check_keys(spec: Mapping[str, Any], allowed: Sequence[str], prefix: str) -> None:
    """Reject unknown keys: a misspelt parameter must not silently fall back to its default."""
    for key in spec:
        if key not in allowed:
            raise HyperparameterError(
                f"{prefix}.{key}", spec[key], f"unknown key; allowed: {', '.join(allowed)}"
            )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _int(
    spec: Mapping[str, Any], key: str, prefix: str, default: int | None, *, minimum: int
) -> int:
    """An integer parameter in [minimum, MAX_INT]; default None means required."""
    value = spec.get(key, default)
    allowed = f"an integer in [{minimum}, {MAX_INT}]"
    if value is None and default is None:
        raise HyperparameterError(f"{prefix}.{key}", None, f"required: {allowed}")
    if not _is_int(value) or not minimum <= value <= MAX_INT:
        raise HyperparameterError(f"{prefix}.{key}", value, allowed)
    return value


def _float(
    spec: Mapping[str, Any],
    key: str,
    prefix: str,
    default: float | None,
    *,
    low: float | None = None,
    high: float | None = None,
    allowed: str = _NON_NEGATIVE,
) -> float:
    """A finite float parameter >= 0 (and in [low, high] when given); default None = required."""
    value = spec.get(key, default)
    if value is None and default is None:
        raise HyperparameterError(f"{prefix}.{key}", None, f"required: {allowed}")
    ok = _is_number(value) and math.isfinite(value) and value >= 0
    if ok and low is not None:
        ok = value >= low
    if ok and high is not None:
        ok = value <= high
    if not ok:
        raise HyperparameterError(f"{prefix}.{key}", value, allowed)
    return float(value)


def _list(spec: Mapping[str, Any], key: str, prefix: str, *, min_len: int = 0) -> list[Any]:
    """A JSON array parameter of bounded length (required)."""
    value = spec.get(key)
    if not isinstance(value, list | tuple) or not min_len <= len(value) <= MAX_ITEMS:
        raise HyperparameterError(
            f"{prefix}.{key}", value, f"a list of {min_len} to {MAX_ITEMS} items"
        )
    return list(value)


def _int_list(spec: Mapping[str, Any], key: str, prefix: str, *, minimum: int) -> tuple[int, ...]:
    """A list of integers in [minimum, MAX_INT]."""
    values = _list(spec, key, prefix)
    for value in values:
        if not _is_int(value) or not minimum <= value <= MAX_INT:
            raise HyperparameterError(
                f"{prefix}.{key}", values, f"a list of integers in [{minimum}, {MAX_INT}]"
            )
    return tuple(values)


def _lr_value(field: str, value: Any) -> float:
    """A learning rate: finite and >= 0, like torch.optim's own check."""
    if not _is_number(value) or not math.isfinite(value) or value < 0:
        raise HyperparameterError(field, value, _NON_NEGATIVE)
    return float(value)
