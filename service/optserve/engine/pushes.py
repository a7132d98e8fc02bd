"""What one batch of pushes does, apart from I/O: the plan (replays, refusals, work) and the run
(each push its own optimizer step, in arrival order). The run is pure numpy and runs off the
event loop; the session service does the loading and the one commit around it."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import orjson

from ..optim import TensorState
from ..optim.schedules import ScheduleState
from ..optim.update import apply_update, find_non_finite
from .arrays import ParamsOut, copies
from .errors import EngineError
from .session_config import SessionConfig

Returning = Literal["all", "pushed", "none"]


@dataclass(frozen=True)
class PushRequest:
    """One gradient push as the API received it."""

    grads: Mapping[str, np.ndarray]
    returning: Returning = "all"
    base_version: int | None = None
    worker: str | None = None
    idempotency_key: str | None = None
    #: sha256 of the request body: the same key with another body is refused
    body_digest: str | None = None
    params_out: ParamsOut | None = None

    @property
    def key_digest(self) -> str | None:
        """Keys are client text of any length: stored under their hash."""
        if self.idempotency_key is None:
            return None
        return hashlib.sha256(self.idempotency_key.encode()).hexdigest()[:40]


@dataclass(frozen=True)
class PushResult:
    version: int
    params: dict[str, np.ndarray]
    applied: bool
    skipped: str | None = None
    total_norm: float | None = None
    staleness: int | None = None
    #: True when this answers a retried Idempotency-Key from the stored first response
    replayed: bool = False
    #: the version of the params returned, when it is not `version` (a replay's are current)
    params_version: int | None = None
    #: the lr the session's next update will use (a schedule may have moved it)
    lr: float | None = None
    #: sync mode: the round this push was applied in, and how many pushes it averaged
    round: int | None = None
    round_workers: int | None = None
    #: the session's mode, "async" or "sync" (a metrics label)
    mode: str = "async"


@dataclass
class BatchRun:
    outcomes: dict[int, PushResult | EngineError] = field(default_factory=dict)
    #: idempotency digest -> record to store with the commit
    records: dict[str, str] = field(default_factory=dict)
    stepped: set[str] = field(default_factory=set)
    applied: int = 0
    schedule: ScheduleState | None = None
    #: each applied push in order: (index, the lr it ran with, the schedule after it); the hot
    #: engine logs these so that replay repeats the step exactly
    steps: list[tuple[int, float, ScheduleState]] = field(default_factory=list)


@dataclass
class BatchPlan:
    results: dict[int, PushResult | BaseException] = field(default_factory=dict)
    replays: dict[int, dict] = field(default_factory=dict)
    followers: dict[int, int] = field(default_factory=dict)
    grads: dict[int, dict[str, np.ndarray]] = field(default_factory=dict)
    todo: list[int] = field(default_factory=list)
    pushed: list[str] = field(default_factory=list)
    wants_all: bool = False
    replay_names: set[str] = field(default_factory=set)

    def params_needed(self, config: SessionConfig) -> list[str]:
        if self.wants_all:
            return list(config.tensors)
        names = set(self.pushed) | self.replay_names
        return [name for name in config.tensors if name in names]

    def finish(
        self,
        pushes: Sequence[PushRequest],
        run: BatchRun,
        params: Mapping[str, np.ndarray],
        current_version: int,
    ) -> list[PushResult | BaseException]:
        """One result per push, in order; replays carry the current params."""
        out: list[PushResult | BaseException] = []
        for index, push in enumerate(pushes):
            if index in self.results:
                out.append(self.results[index])
            elif index in run.outcomes:
                out.append(run.outcomes[index])
            elif index in self.followers:
                leader = self.followers[index]
                out.append(self.results.get(leader) or run.outcomes[leader])
            else:
                record = self.replays[index]
                out.append(
                    PushResult(
                        version=record["version"],
                        params=returned(push, params),
                        applied=record["applied"],
                        skipped=record.get("skipped"),
                        total_norm=record.get("total_norm"),
                        staleness=record.get("staleness"),
                        replayed=True,
                        params_version=current_version,
                    )
                )
        return out


def returned(
    push: PushRequest, params: Mapping[str, np.ndarray], copy: bool = True
) -> dict[str, np.ndarray]:
    """The params this push asked to get back: copies if later pushes of the batch will still
    update `params` in place, the arrays themselves for the last one (no copy per push); or
    copied into the push's `params_out` arrays, where it has them."""
    if push.returning == "none":
        return {}
    names = params if push.returning == "all" else [n for n in params if n in push.grads]
    if copy or push.params_out is not None:
        return copies(params, names, push.params_out)
    return {name: params[name] for name in names}


def run_pushes(
    config: SessionConfig,
    pushes: Sequence[PushRequest],
    plan: BatchPlan,
    params: dict[str, np.ndarray],
    states: dict[str, TensorState],
    schedule: ScheduleState,
    version: int,
    *,
    copy_last: bool = False,
) -> BatchRun:
    """Apply the planned pushes in order, in place on `params` and `states`.

    The last push's result shares `params`' arrays unless `copy_last` (the hot engine, whose
    arrays live on and change under the next batch while the response is being encoded).
    """
    algorithm, hp = config.algorithm, config.hyperparameters
    run = BatchRun(schedule=schedule)
    last = None if copy_last or not plan.todo else plan.todo[-1]
    for index in plan.todo:
        push, grads = pushes[index], plan.grads[index]
        lr = run.schedule.lr
        staleness = None
        if push.base_version is not None:
            if push.base_version > version:
                run.outcomes[index] = EngineError(
                    "invalid_session",
                    f"base_version {push.base_version} is ahead of the session ({version})",
                    version=version,
                )
                continue
            staleness = version - push.base_version
            if config.max_staleness is not None and staleness > config.max_staleness:
                if config.staleness == "reject":
                    run.outcomes[index] = EngineError(
                        "stale_gradient",
                        f"gradient computed at version {push.base_version} is {staleness} "
                        f"versions behind; this session accepts at most {config.max_staleness}",
                        version=version,
                        staleness=staleness,
                        max_staleness=config.max_staleness,
                    )
                    continue
                lr = lr / (1 + staleness)
        bad = find_non_finite(grads)
        if bad and config.nonfinite == "reject":
            run.outcomes[index] = EngineError(
                "non_finite",
                f"non-finite values (NaN or inf) in gradient(s): {', '.join(bad)}",
                tensors=bad,
            )
            continue
        if bad:
            outcome = PushResult(
                version, returned(push, params, index != last), False, skipped="non_finite"
            )
        else:
            if config.clip_grad_norm is not None:  # clipping scales in place: keep the originals
                grads = {name: grad.copy() for name, grad in grads.items()}
            result = apply_update(
                algorithm, hp, params, grads, states, lr, max_norm=config.clip_grad_norm
            )
            version += 1
            run.applied += 1
            run.schedule = config.schedule.advance(run.schedule)
            run.stepped.update(result.stepped)
            run.steps.append((index, lr, run.schedule))
            outcome = PushResult(
                version,
                returned(push, params, index != last),
                True,
                total_norm=result.total_norm,
                staleness=staleness,
                lr=run.schedule.lr,
            )
        run.outcomes[index] = outcome
        if push.key_digest is not None:
            run.records[push.key_digest] = _record(push, outcome)
    return run


def _record(push: PushRequest, outcome: PushResult) -> str:
    record = {"request": push.body_digest, "version": outcome.version, "applied": outcome.applied}
    for name in ("skipped", "total_norm", "staleness"):
        value = getattr(outcome, name)
        if value is not None:
            record[name] = value
    return orjson.dumps(record).decode()


def key_reused() -> EngineError:
    return EngineError(
        "idempotency_key_reused",
        "this Idempotency-Key was used for a different request body; use a new key",
    )
