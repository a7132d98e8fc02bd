"""A session's configuration: validated once at creation, stored as JSON in the session's meta."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np

from ..optim import Algorithm, HyperparameterError, get_algorithm
from ..optim.schedules import Schedule, make_schedule
from .errors import invalid_session
from .rounds import RoundSpec

NONFINITE_POLICIES = ("reject", "skip")
STALENESS_POLICIES = ("reject", "scale")
MAX_NDIM = 64  # numpy's limit


def check_shape(name: str, shape: Any) -> tuple[int, ...]:
    if not isinstance(shape, list | tuple) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise invalid_session(f"tensor {name!r}: shape must be a list of non-negative integers")
    if len(shape) > MAX_NDIM:
        raise invalid_session(f"tensor {name!r}: shape has more than {MAX_NDIM} dimensions")
    return tuple(shape)


@dataclass(frozen=True)
class SessionConfig:
    """Everything that defines how a session's updates are computed."""

    optimizer: str
    hyperparameters: dict[str, Any]
    tensors: dict[str, tuple[int, ...]]
    name: str | None = None
    mode: dict[str, Any] = field(default_factory=lambda: {"type": "async"})
    lr_schedule: dict[str, Any] | None = None
    clip_grad_norm: float | None = None
    nonfinite: str = "reject"
    #: a push whose base_version is more than this many versions behind is stale
    max_staleness: int | None = None
    #: stale pushes: "reject" (409 stale_gradient) or "scale" (lr / (1 + staleness))
    staleness: str = "reject"

    @property
    def algorithm(self) -> Algorithm:
        return get_algorithm(self.optimizer)

    @property
    def round_spec(self) -> RoundSpec | None:
        """Sync mode's rounds, or None for async sessions."""
        return RoundSpec.from_mode(self.mode) if self.mode.get("type") == "sync" else None

    @property
    def schedule(self) -> Schedule:
        return make_schedule(self.lr_schedule)

    @property
    def optimizer_view(self) -> dict[str, Any]:
        """The optimizer as the API shows it: name and every hyperparameter, defaults filled."""
        return {"name": self.optimizer, **_jsonable(self.hyperparameters)}

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["hyperparameters"] = _jsonable(self.hyperparameters)
        data["tensors"] = {k: list(v) for k, v in self.tensors.items()}
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> SessionConfig:
        algorithm = get_algorithm(data["optimizer"])
        return cls(
            optimizer=algorithm.name,
            hyperparameters=algorithm.configure(data["hyperparameters"]),
            tensors={k: tuple(v) for k, v in data["tensors"].items()},
            name=data.get("name"),
            mode=dict(data.get("mode") or {"type": "async"}),
            lr_schedule=data.get("lr_schedule"),
            clip_grad_norm=data.get("clip_grad_norm"),
            nonfinite=data.get("nonfinite", "reject"),
            max_staleness=data.get("max_staleness"),
            staleness=data.get("staleness", "reject"),
        )

    def with_hyperparameters(self, changes: Mapping[str, Any]) -> SessionConfig:
        """Merge hyperparameter changes (PATCH), re-validated; refuses changes to state layout.

        Turning on e.g. `amsgrad` or `centered` mid-run would need state torch never created
        (torch raises a KeyError there), so those stay as they were created.
        """
        if "name" in changes:
            raise HyperparameterError("name", changes["name"], "the optimizer cannot be changed")
        algorithm = self.algorithm
        merged = algorithm.configure({**self.hyperparameters, **changes})
        probe = np.zeros(1, dtype=np.float32)
        before, after = algorithm.init(probe, self.hyperparameters), algorithm.init(probe, merged)
        if set(before) != set(after):
            changed = sorted(k for k in changes if merged[k] != self.hyperparameters.get(k))
            raise HyperparameterError(
                ",".join(changed) or "optimizer",
                {k: changes[k] for k in changed},
                "cannot change after creation: it changes which state the optimizer keeps",
            )
        return replace(self, hyperparameters=merged)


def _jsonable(hp: Mapping[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in hp.items()}


def build_config(
    *,
    optimizer: Any,
    tensors: Mapping[str, tuple[int, ...]],
    name: Any = None,
    mode: Any = None,
    lr_schedule: Any = None,
    clip_grad_norm: Any = None,
    nonfinite: Any = "reject",
    max_staleness: Any = None,
    staleness: Any = "reject",
) -> SessionConfig:
    """Validate a creation request's fields; raises EngineError or HyperparameterError."""
    if not isinstance(optimizer, Mapping) or "name" not in optimizer:
        raise invalid_session('"optimizer" must be an object with a "name"')
    algorithm = get_algorithm(optimizer["name"])
    hyperparameters = algorithm.configure({k: v for k, v in optimizer.items() if k != "name"})
    if not tensors:
        raise invalid_session("a session needs at least one tensor")
    if name is not None and (not isinstance(name, str) or len(name) > 256):
        raise invalid_session('"name" must be a string of at most 256 characters')
    mode = {"type": "async"} if mode is None else mode
    if isinstance(mode, Mapping) and mode.get("type") == "sync":
        mode = RoundSpec.from_mode(mode).to_mode()
    elif not isinstance(mode, Mapping) or mode.get("type") != "async" or set(mode) != {"type"}:
        raise invalid_session('"mode" must be {"type": "async"} or {"type": "sync", ...}')
    if lr_schedule is not None and not isinstance(lr_schedule, Mapping):
        raise invalid_session('"lr_schedule" must be an object')
    schedule = make_schedule(lr_schedule)
    if clip_grad_norm is not None and (
        isinstance(clip_grad_norm, bool)
        or not isinstance(clip_grad_norm, int | float)
        or not math.isfinite(clip_grad_norm)
        or clip_grad_norm <= 0
    ):
        raise HyperparameterError("clip_grad_norm", clip_grad_norm, "a finite number > 0")
    if nonfinite not in NONFINITE_POLICIES:
        raise invalid_session(f'"nonfinite" must be one of {", ".join(NONFINITE_POLICIES)}')
    if max_staleness is not None and (
        isinstance(max_staleness, bool) or not isinstance(max_staleness, int) or max_staleness < 0
    ):
        raise invalid_session('"max_staleness" must be a non-negative integer or null')
    if staleness not in STALENESS_POLICIES:
        raise invalid_session(f'"staleness" must be one of {", ".join(STALENESS_POLICIES)}')
    return SessionConfig(
        optimizer=algorithm.name,
        hyperparameters=hyperparameters,
        tensors=dict(tensors),
        name=name,
        mode=dict(mode),
        lr_schedule=schedule.to_json() if lr_schedule is not None else None,
        clip_grad_norm=float(clip_grad_norm) if clip_grad_norm is not None else None,
        nonfinite=nonfinite,
        max_staleness=max_staleness,
        staleness=staleness,
    )
