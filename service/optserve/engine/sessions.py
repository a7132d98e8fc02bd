"""The session service: what each API operation means, on top of the store and the optimizer core.

Every write is a compare-and-set commit on the session version, so nothing is ever written over a
newer version, and pushes to one session are serialised inside the process (one lock per session)
so they do not waste commits racing each other. The numpy work runs off the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

import numpy as np
import orjson
from anyio import to_thread

from ..metrics import Metrics
from ..optim import GradientError, TensorState
from ..optim.schedules import ScheduleState
from ..optim.update import check_gradients, find_non_finite, initial_states
from ..store.errors import IdempotencyConflict, SessionGone, VersionConflict
from ..store.keys import TTL_FIELD
from ..store.redis_store import KEEP, RedisStore, Snapshot
from ..store.tenants import DEFAULT_TENANT, TENANT_FIELD, TenantIndex
from .arrays import ParamsOut, array_from_bytes, state_from_fields, state_to_fields, to_bytes
from .batcher import Batcher
from .errors import EngineError, invalid_session, not_found
from .events import VersionEvents
from .lifetime import Lifetime, ttl_s_of
from .limits import Limits
from .pushes import BatchPlan, BatchRun, PushRequest, PushResult, key_reused, run_pushes
from .rounds import RoundCoordinator
from .session_config import SessionConfig, build_config, check_shape
from .state_io import check_tensor_state, stepped_layout
from .tenancy import Tenancy

#: Commits lost to another process (several replicas on one Redis) are retried this often.
MAX_COMMIT_ATTEMPTS = 16
#: A batch that keeps losing commits to other replicas gives up after this long (409 conflict).
CONFLICT_DEADLINE_S = 30.0
#: How long a session's apply lease lasts if its holder dies without giving it back.
LEASE_MS = 10_000


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class ParamsResult:
    version: int
    params: dict[str, np.ndarray]


class SessionService:
    """All session operations; methods raise EngineError, HyperparameterError or store errors."""

    def __init__(
        self,
        store: RedisStore,
        *,
        group_commit: bool = True,
        idempotency_ttl_s: float = 86_400.0,
        events: VersionEvents | None = None,
        rounds: RoundCoordinator | None = None,
        lifetime: Lifetime | None = None,
        metrics: Metrics | None = None,
        limits: Limits | None = None,
    ) -> None:
        self.store = store
        self.lifetime = lifetime or Lifetime()
        self.limits = limits or Limits()
        self.tenancy = Tenancy(TenantIndex(store.client), self.limits)
        self.metrics = metrics or store.metrics
        self.rounds = rounds or RoundCoordinator(store.client, metrics=self.metrics)
        self._modes: dict[str, dict[str, Any]] = {}
        self.idempotency_ttl_s = idempotency_ttl_s
        self.events = events
        self._batcher: Batcher[PushRequest, PushResult] = Batcher(
            self._apply_batch, group=group_commit
        )
        self._locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()
        self._long_polls: set[asyncio.Event] = set()
        self._releasing = False

    def release_long_polls(self) -> None:
        """The graceful shutdown began: long-polls answer now (304, as at their deadline)
        instead of holding the exit for up to a minute; pushes in flight carry on."""
        self._releasing = True
        for event in self._long_polls:
            event.set()

    async def close(self, wait_s: float = 30.0) -> None:
        """Shutdown, once no request is left: rounds and pushes already queued or being applied
        finish and commit (up to `wait_s` each), then the appliers stop."""
        self.release_long_polls()
        await self.rounds.close(wait_s=wait_s)
        await self._batcher.close(wait_s=wait_s)

    def _lock(self, sid: str) -> asyncio.Lock:
        lock = self._locks.get(sid)
        if lock is None:
            lock = self._locks[sid] = asyncio.Lock()
        return lock

    # -- reading ---------------------------------------------------------------------------------

    async def _meta(self, sid: str) -> Snapshot:
        try:
            return await self.store.read_meta(sid)
        except SessionGone:
            raise not_found(sid) from None

    async def _read(self, sid: str, params=None, state_of=()) -> Snapshot:
        try:
            return await self.store.read(sid, params=params, state_of=state_of)
        except SessionGone:
            raise not_found(sid) from None

    @staticmethod
    def config_of(snap: Snapshot) -> SessionConfig:
        return SessionConfig.from_json(orjson.loads(snap.meta["config"]))

    def view(self, snap: Snapshot) -> dict[str, Any]:
        """The session as the API returns it."""
        config = self.config_of(snap)
        schedule = ScheduleState.from_dict(orjson.loads(snap.meta["schedule"]))
        return {
            "id": snap.sid,
            "name": config.name,
            "version": snap.version,
            "optimizer": config.optimizer_view,
            "tensors": {
                n: {"shape": list(s), "dtype": "float32"} for n, s in config.tensors.items()
            },
            "mode": config.mode,
            "lr_schedule": config.lr_schedule,
            "lr": schedule.lr,
            "clip_grad_norm": config.clip_grad_norm,
            "nonfinite": config.nonfinite,
            "max_staleness": config.max_staleness,
            "staleness": config.staleness,
            "ttl_s": ttl_s_of(snap.meta),
            "created_at": snap.meta["created_at"],
            "updated_at": snap.meta["updated_at"],
        }

    async def get(self, sid: str) -> dict[str, Any]:
        snap = await self._meta(sid)
        await self.store.touch(snap)  # a read is a use: it renews the session's TTL
        return self.view(snap)

    async def list(
        self, offset: int = 0, limit: int = 100, tenant: str = DEFAULT_TENANT
    ) -> list[dict[str, Any]]:
        """The tenant's sessions, oldest first. Listing is not a use of each session: it renews
        no TTL."""
        views = []
        gone = []
        for sid in await self.tenancy.ids(tenant, offset, limit):
            try:
                views.append(self.view(await self.store.read_meta(sid)))
            except SessionGone:  # expired or deleted meanwhile (or a crash left the entry)
                gone.append(sid)
                await self.tenancy.drop(tenant, sid)
        await self.store.forget(gone)
        return views

    # -- creating and deleting -------------------------------------------------------------------

    async def create(
        self,
        fields: Mapping[str, Any],
        params: Mapping[str, np.ndarray],
        tenant: str = DEFAULT_TENANT,
    ) -> dict[str, Any]:
        """Create a session from the request's fields and its initial `params` tensors."""
        _reject_non_finite(params, "initial params")
        declared = fields.get("tensors") or {}
        if not isinstance(declared, Mapping):
            raise invalid_session('"tensors" must map names to {"shape": [...]}')
        shapes: dict[str, tuple[int, ...]] = {}
        for name, array in params.items():
            shapes[self.limits.check_name(name)] = tuple(array.shape)
        for name, spec in declared.items():
            self.limits.check_name(name)
            if name in shapes:
                raise invalid_session(f"tensor {name!r} is both in params and in tensors")
            if not isinstance(spec, Mapping) or set(spec) - {"shape", "dtype"}:
                raise invalid_session(f'tensor {name!r}: declare it as {{"shape": [...]}}')
            if spec.get("dtype", "float32") != "float32":
                raise invalid_session(f"tensor {name!r}: only float32 tensors are supported")
            shapes[name] = check_shape(name, spec.get("shape"))
        self.limits.check_session(shapes.items())  # before np.zeros allocates what they declare
        config = build_config(
            optimizer=fields.get("optimizer"),
            tensors=shapes,
            name=fields.get("name"),
            mode=fields.get("mode"),
            lr_schedule=fields.get("lr_schedule"),
            clip_grad_norm=fields.get("clip_grad_norm"),
            nonfinite=fields.get("nonfinite", "reject"),
            max_staleness=fields.get("max_staleness"),
            staleness=fields.get("staleness", "reject"),
        )
        arrays = {
            name: np.zeros(shape, np.float32) if name not in params else params[name]
            for name, shape in shapes.items()
        }
        states = initial_states(config.algorithm, config.hyperparameters, arrays)
        writes = {
            name: {"param": to_bytes(array), **state_to_fields(states.get(name, {}))}
            for name, array in arrays.items()
        }
        # 128 random bits as hex: never starts with "-" (an option to any CLI) or holds "_"
        sid = secrets.token_hex(16)
        now = _now()
        schedule = config.schedule.start(config.hyperparameters["lr"])
        meta = {
            "config": orjson.dumps(config.to_json()).decode(),
            "schedule": orjson.dumps(schedule.to_dict()).decode(),
            "created_at": now,
            "updated_at": now,
            TENANT_FIELD: tenant,
        }
        ttl_ms = self.lifetime.ttl_ms(fields, creating=True)
        if ttl_ms is not None:
            meta[TTL_FIELD] = str(ttl_ms)
        # Index first, session second (store/tenants.py): a crash between them leaves an index
        # entry without a session, never a session its tenant cannot list.
        await self.tenancy.admit(tenant, sid)
        try:
            await self.store.create(sid, meta, writes)
        except BaseException:
            await self.tenancy.drop(tenant, sid)
            raise
        return self.view(await self._meta(sid))

    async def delete(self, sid: str) -> None:
        self._modes.pop(sid, None)
        tenant = await self.tenancy.owner(sid)
        if not await self.store.delete(sid):
            raise not_found(sid)
        if tenant is not None:
            await self.tenancy.drop(tenant, sid)  # after the session: see store/tenants.py

    # -- changing hyperparameters ----------------------------------------------------------------

    async def patch(self, sid: str, changes: Mapping[str, Any]) -> dict[str, Any]:
        """Change hyperparameters (and clip/nonfinite/name) in flight; the version is kept.

        A new lr behaves like torch's `group["lr"] = lr`: a running schedule continues from it.
        """
        self._check_patch(changes)
        ttl_ms = self.lifetime.ttl_ms(changes, creating=False) if "ttl_s" in changes else KEEP
        async with self._lock(sid):
            for _ in range(MAX_COMMIT_ATTEMPTS):
                snap = await self._meta(sid)
                schedule = ScheduleState.from_dict(orjson.loads(snap.meta["schedule"]))
                rebuilt, schedule = self.patched(self.config_of(snap), schedule, changes)
                meta = {
                    "config": orjson.dumps(rebuilt.to_json()).decode(),
                    "schedule": orjson.dumps(schedule.to_dict()).decode(),
                    "updated_at": _now(),
                }
                try:
                    await self.store.commit(snap, {}, meta, bump_version=False, ttl_ms=ttl_ms)
                except VersionConflict:
                    continue
                except SessionGone:
                    raise not_found(sid) from None
                return await self.get(sid)
        raise EngineError("conflict", "the session kept changing; try again")

    @staticmethod
    def _check_patch(changes: Mapping[str, Any]) -> None:
        allowed = {"optimizer", "clip_grad_norm", "nonfinite", "name", "max_staleness", "staleness"}
        unknown = set(changes) - allowed - {"ttl_s"}
        if unknown:
            raise invalid_session(f"cannot change {', '.join(sorted(unknown))}")

    @staticmethod
    def patched(
        config: SessionConfig, schedule: ScheduleState, changes: Mapping[str, Any]
    ) -> tuple[SessionConfig, ScheduleState]:
        """The config and schedule after a PATCH (validated; raises like build_config)."""
        optimizer = changes.get("optimizer", {})
        if not isinstance(optimizer, Mapping):
            raise invalid_session('"optimizer" must be an object of hyperparameters')
        same_name = optimizer.get("name") == config.optimizer
        optimizer = {k: v for k, v in optimizer.items() if not (k == "name" and same_name)}
        config = config.with_hyperparameters(optimizer)
        if "lr" in optimizer:
            schedule = schedule.with_lr(config.hyperparameters["lr"])
        rebuilt = build_config(
            optimizer=config.optimizer_view,
            tensors=config.tensors,
            name=changes.get("name", config.name),
            mode=config.mode,
            lr_schedule=config.lr_schedule,
            clip_grad_norm=changes.get("clip_grad_norm", config.clip_grad_norm),
            nonfinite=changes.get("nonfinite", config.nonfinite),
            max_staleness=changes.get("max_staleness", config.max_staleness),
            staleness=changes.get("staleness", config.staleness),
        )
        return rebuilt, schedule

    # -- params ----------------------------------------------------------------------------------

    async def get_params(
        self, sid: str, names: list[str] | None = None, out: ParamsOut | None = None
    ) -> ParamsResult:
        """The current params (all, or `names`); copied into what `out` allocates, if given."""
        if names is not None:
            config = self.config_of(await self._meta(sid))
            for name in names:
                if name not in config.tensors:
                    raise EngineError("unknown_tensor", f"the session has no tensor {name!r}")
        snap = await self._read(sid, params=names)
        config = self.config_of(snap)
        shapes = {
            name: tuple(config.tensors[name])
            for name in (names if names is not None else config.tensors)
        }
        into = out(shapes) if out else {}
        params = {
            name: array_from_bytes(snap.arrays[(name, "param")], shape, into.get(name))
            for name, shape in shapes.items()
        }
        return ParamsResult(snap.version, params)

    async def wait_for_version(self, sid: str, after: int, wait_s: float) -> bool:
        """Long-poll: True as soon as the version is past `after`, False when `wait_s` is up.

        Woken by the commit's version event (any replica), not by polling Redis: the version is
        read once on entry and once per event.
        """
        if self.events is None:
            raise RuntimeError("long-poll needs the version events hub")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(0.0, wait_s)
        event = asyncio.Event()
        self._long_polls.add(event)
        try:
            with self.events.watch(sid, event):
                while True:
                    event.clear()
                    try:
                        if await self.store.version(sid) > after:
                            return True
                    except SessionGone:
                        raise not_found(sid) from None
                    remaining = deadline - loop.time()
                    if remaining <= 0 or self._releasing:
                        return False
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(event.wait(), remaining)
        finally:
            self._long_polls.discard(event)

    async def put_params(
        self, sid: str, params: Mapping[str, np.ndarray], if_match: int | None
    ) -> int:
        """Replace parameter values (state untouched); returns the new version."""
        async with self._lock(sid):
            snap = await self._meta(sid)
            config = self.config_of(snap)
            self._check_known(config, params)
            _reject_non_finite(params, "params")
            check_if_match(if_match, snap.version)
            writes = {name: {"param": to_bytes(array)} for name, array in params.items()}
            meta = {"updated_at": _now()}
            for _ in range(MAX_COMMIT_ATTEMPTS):
                try:
                    return await self.store.commit(snap, writes, meta)
                except VersionConflict as conflict:
                    if if_match is not None:
                        raise EngineError(
                            "precondition_failed",
                            f"the session moved to version {conflict.current}",
                            version=conflict.current,
                        ) from None
                    snap = await self._meta(sid)
                except SessionGone:
                    raise not_found(sid) from None
        raise EngineError("conflict", "the session kept changing; try again")

    @staticmethod
    def _check_known(config: SessionConfig, arrays: Mapping[str, np.ndarray]) -> None:
        for name, array in arrays.items():
            shape = config.tensors.get(name)
            if shape is None:
                raise EngineError(
                    "unknown_tensor", f"the session has no tensor {name!r}", tensor=name
                )
            if tuple(array.shape) != shape:
                raise EngineError(
                    "shape_mismatch",
                    f"tensor {name!r} has shape {list(shape)}, got {list(array.shape)}",
                    tensor=name,
                )

    # -- pushing gradients -----------------------------------------------------------------------

    async def push(self, sid: str, request: PushRequest) -> PushResult:
        """One push: async sessions queue it for the session's applier (its own step); sync
        sessions add it to the open round (one step on the round's mean gradient)."""
        if not request.grads:
            raise invalid_session("a push needs at least one gradient")
        mode = self._modes.get(sid)
        if mode is None:  # a session's mode never changes: read it once per process
            mode = self._modes[sid] = self.config_of(await self._meta(sid)).mode
            if len(self._modes) > 100_000:
                self._modes.pop(next(iter(self._modes)))
        if mode.get("type") == "sync":
            return replace(await self._push_sync(sid, request), mode="sync")
        return await self._batcher.submit(sid, request)

    async def _push_sync(self, sid: str, request: PushRequest) -> PushResult:
        """Join the session's open round and wait for it (a barrier across every replica).

        Idempotency-Key: a key whose round was applied replays it; the record is written after
        the round, so a crash between the two could let a retry join a later round (the `worker`
        duplicate check still keeps one worker out of a round twice).
        """
        meta = await self._meta(sid)
        config = self.config_of(meta)
        spec = config.round_spec
        assert spec is not None
        digest = request.key_digest
        if digest is not None:
            stored = await self.store.read_idempotency(sid, [digest])
            if digest in stored:
                first = orjson.loads(stored[digest])
                if first["request"] != request.body_digest:
                    raise key_reused()
                current = await self.get_params(sid, self._returned_names(config, request))
                return PushResult(
                    version=first["version"],
                    params=current.params,
                    applied=first["applied"],
                    round=first.get("round"),
                    replayed=True,
                    params_version=current.version,
                )
        try:
            grads = check_gradients(config.tensors, request.grads)
        except GradientError as error:
            raise EngineError(error.code, str(error), tensor=error.tensor) from None
        bad = find_non_finite(grads)
        if bad and config.nonfinite == "reject":
            raise EngineError(
                "non_finite",
                f"non-finite values (NaN or inf) in gradient(s): {', '.join(bad)}",
                tensors=bad,
            )
        if bad:  # "skip": this worker sits the round out
            current = await self.get_params(sid, self._returned_names(config, request))
            return PushResult(current.version, current.params, False, skipped="non_finite")

        async def apply(number: int, mean: dict[str, np.ndarray], pushes: int):
            step = await self._batcher.submit(sid, PushRequest(grads=mean, returning="all"))
            return step.version, step.params

        result = await self.rounds.join(sid, request.worker, grads, spec, apply)
        if digest is not None:
            record = {"request": request.body_digest, "version": result.version}
            record |= {"applied": True, "round": result.round}
            await self.store.put_idempotency(
                sid, digest, orjson.dumps(record).decode(), int(self.idempotency_ttl_s * 1000)
            )
        names = self._returned_names(config, request)
        return PushResult(
            version=result.version,
            params={name: result.params[name] for name in names},
            applied=True,
            round=result.round,
            round_workers=result.workers,
        )

    @staticmethod
    def _returned_names(config: SessionConfig, request: PushRequest) -> list[str]:
        if request.returning == "none":
            return []
        if request.returning == "all":
            return list(config.tensors)
        return [name for name in config.tensors if name in request.grads]

    async def _apply_batch(
        self, sid: str, pushes: Sequence[PushRequest]
    ) -> list[PushResult | BaseException]:
        """Apply queued pushes in arrival order, each its own step, with one load and one commit.

        The first attempt is optimistic. A commit lost to another process (a replica on the same
        session) reloads and re-applies the whole batch, holding the session's lease so that the
        replicas take turns instead of racing; a process defers to a lease held by another.
        Nothing is ever written over a newer version: the commit is a compare-and-set either way.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + CONFLICT_DEADLINE_S
        token: str | None = None
        delay = 0.002
        try:
            while loop.time() < deadline:
                meta = await self._meta(sid)
                if meta.lease is not None and meta.lease != token:
                    await self._wait_for_change(sid, delay)  # another replica's turn
                    delay = min(delay * 2, 0.05)
                    continue
                results = await self._try_batch(sid, pushes, meta)
                if results is not None:
                    return results
                if token is None:
                    candidate = secrets.token_hex(8)
                    if await self.store.take_lease(sid, candidate, LEASE_MS):
                        token = candidate
        finally:
            if token is not None:
                await self.store.release_lease(sid, token)
        conflict = EngineError("conflict", "the session kept changing; try again")
        return [conflict] * len(pushes)

    async def _wait_for_change(self, sid: str, timeout: float) -> None:
        """Sleep until the session's next version event, at most `timeout` seconds."""
        event = asyncio.Event()
        if self.events is None:
            await asyncio.sleep(timeout)
            return
        with self.events.watch(sid, event), contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), timeout)

    async def _try_batch(
        self, sid: str, pushes: Sequence[PushRequest], meta: Snapshot
    ) -> list[PushResult | BaseException] | None:
        config = self.config_of(meta)
        plan = await self._plan(sid, config, pushes)
        needed = plan.params_needed(config)
        try:
            snap = await self.store.read(sid, params=needed, state_of=plan.pushed, base=meta)
        except VersionConflict:
            return None  # a commit landed since the meta was read: start again
        except SessionGone:
            raise not_found(sid) from None
        schedule = ScheduleState.from_dict(orjson.loads(snap.meta["schedule"]))
        params: dict[str, np.ndarray] = {}
        states: dict[str, TensorState] = {}

        def decode_and_run() -> BatchRun:
            # Off the event loop: decoding is a copy of every array read (120 MB at 1e7 Adam);
            # each array's stored bytes are dropped as soon as it is decoded, bounding the peak.
            params.update(self._decode_params(snap, config, needed, consume=True))
            states.update(self._decode_states(snap, config, plan.pushed, consume=True))
            return run_pushes(config, pushes, plan, params, states, schedule, snap.version)

        run = await to_thread.run_sync(decode_and_run)
        if run.applied or run.records:
            writes = {
                name: {"param": to_bytes(params[name]), **state_to_fields(states[name])}
                for name in plan.pushed
                if name in run.stepped
            }
            meta_update = {"updated_at": _now()}
            if run.applied:
                meta_update["schedule"] = orjson.dumps(run.schedule.to_dict()).decode()
            try:
                await self.store.commit(
                    snap,
                    writes,
                    meta_update,
                    bump_version=run.applied,
                    idempotency=run.records,
                    idempotency_ttl_ms=int(self.idempotency_ttl_s * 1000),
                )
            except (VersionConflict, IdempotencyConflict):
                return None
            except SessionGone:
                raise not_found(sid) from None
        if run.applied:  # committed: these steps are in the store now
            self.metrics.updates_applied.labels(config.mode.get("type", "async")).inc(run.applied)
            self.metrics.group_commit_updates.observe(run.applied)
        return plan.finish(pushes, run, params, snap.version + run.applied)

    async def _plan(
        self, sid: str, config: SessionConfig, pushes: Sequence[PushRequest]
    ) -> BatchPlan:
        """Sort the batch: replays of stored idempotent responses, refusals, and work to do."""
        digests = sorted({p.key_digest for p in pushes if p.key_digest})
        stored = await self.store.read_idempotency(sid, digests)
        plan = BatchPlan()
        leaders: dict[str, int] = {}
        for index, push in enumerate(pushes):
            digest = push.key_digest
            if digest is not None:
                record = stored.get(digest)
                leader = leaders.get(digest)
                first = orjson.loads(record) if record is not None else None
                if first is not None and first["request"] != push.body_digest:
                    plan.results[index] = key_reused()
                elif first is not None:
                    plan.replays[index] = first
                elif leader is not None and pushes[leader].body_digest != push.body_digest:
                    plan.results[index] = key_reused()
                elif leader is not None:
                    plan.followers[index] = leader  # same key, same body, same batch: one apply
                if first is not None or leader is not None:
                    continue
                leaders[digest] = index
            try:
                plan.grads[index] = check_gradients(config.tensors, push.grads)
            except GradientError as error:
                plan.results[index] = EngineError(error.code, str(error), tensor=error.tensor)
                continue
            plan.todo.append(index)
        names = {n for i in plan.todo for n in plan.grads[i]}
        plan.pushed = [name for name in config.tensors if name in names]
        plan.wants_all = any(pushes[i].returning == "all" for i in (*plan.todo, *plan.replays))
        plan.replay_names = {n for i in plan.replays for n in pushes[i].grads}
        return plan

    @staticmethod
    def _decode_states(
        snap: Snapshot, config: SessionConfig, names: Sequence[str], consume: bool = False
    ) -> dict[str, TensorState]:
        """Optimizer states as arrays; with `consume` the stored bytes leave the snapshot."""
        take = snap.arrays.pop if consume else snap.arrays.__getitem__
        states: dict[str, TensorState] = {}
        for name in names:
            fields = [f for f in snap.manifests.get(name, ()) if f != "param"]
            if fields:
                shape = config.tensors[name]
                states[name] = {}
                for field in fields:  # one array at a time: the bytes go before the next copy
                    states[name].update(state_from_fields({field: take((name, field))}, shape))
        return states

    # -- optimizer state (checkpoints) -------------------------------------------------------------

    async def export_state(self, sid: str) -> dict[str, Any]:
        """Params and every state array with torch's names, the hyperparameters and the schedule."""
        meta = await self._meta(sid)
        snap = await self._read(sid, params=None, state_of=list(meta.manifests))
        config = self.config_of(snap)
        tensors: dict[str, dict[str, Any]] = {}
        for name, shape in config.tensors.items():
            fields = {
                f: snap.arrays[(name, f)] for f in snap.manifests.get(name, ()) if f != "param"
            }
            entry: dict[str, Any] = {"param": array_from_bytes(snap.arrays[(name, "param")], shape)}
            for key, value in state_from_fields(fields, shape).items():
                entry[key] = float(value) if np.ndim(value) == 0 else value
            tensors[name] = entry
        return {
            "version": snap.version,
            "optimizer": config.optimizer_view,
            "lr_schedule": config.lr_schedule,
            "lr_schedule_state": orjson.loads(snap.meta["schedule"]),
            "tensors": tensors,
        }

    async def import_state(
        self,
        sid: str,
        tensors: Mapping[str, Mapping[str, Any]],
        *,
        optimizer: Mapping[str, Any] | None = None,
        schedule_state: Mapping[str, Any] | None = None,
        lr_schedule: Mapping[str, Any] | None = None,
        if_match: int | None = None,
        version: int | None = None,
    ) -> int:
        """Replace params and the whole optimizer state (a checkpoint restore); new version.

        Like torch's `load_state_dict`, saved hyperparameters replace the live ones; a tensor
        listed without state arrays has none afterwards (as if never stepped). With `version`
        the session takes that version instead of adding one (a restore into a new session
        continues the checkpoint's count); versions never go back, so it must be past the
        current one.
        """
        async with self._lock(sid):
            snap = await self._meta(sid)
            config = self.config_of(snap)
            check_if_match(if_match, snap.version)
            check_adopted_version(version, snap.version)
            schedule = ScheduleState.from_dict(orjson.loads(snap.meta["schedule"]))
            config, checked, schedule = self.prepared_import(
                config, schedule, tensors, optimizer, schedule_state, lr_schedule
            )
            writes = {
                name: {"param": to_bytes(param), **state_to_fields(state)}
                for name, (param, state) in checked.items()
            }
            meta = {
                "config": orjson.dumps(config.to_json()).decode(),
                "schedule": orjson.dumps(schedule.to_dict()).decode(),
                "updated_at": _now(),
            }
            try:
                return await self.store.commit(
                    snap,
                    writes,
                    meta,
                    replace_state=list(writes),
                    bump_version=True if version is None else version - snap.version,
                )
            except VersionConflict as conflict:
                raise EngineError(
                    "precondition_failed" if if_match is not None else "conflict",
                    f"the session moved to version {conflict.current} during the import",
                    version=conflict.current,
                ) from None
            except SessionGone:
                raise not_found(sid) from None

    @classmethod
    def prepared_import(
        cls,
        config: SessionConfig,
        schedule: ScheduleState,
        tensors: Mapping[str, Mapping[str, Any]],
        optimizer: Mapping[str, Any] | None,
        schedule_state: Mapping[str, Any] | None,
        lr_schedule: Mapping[str, Any] | None,
    ) -> tuple[SessionConfig, dict[str, tuple[Any, TensorState]], ScheduleState]:
        """A state import checked: the new config, each tensor's (param, state), the schedule."""
        if optimizer is not None:
            if optimizer.get("name", config.optimizer) != config.optimizer:
                raise EngineError(
                    "invalid_state",
                    f"state of {optimizer.get('name')!r} cannot load into {config.optimizer!r}",
                )
            config = config.with_hyperparameters(
                {k: v for k, v in optimizer.items() if k != "name"}
            )
        if lr_schedule is not None and lr_schedule != config.lr_schedule:
            raise EngineError(
                "invalid_state",
                f"the state's lr_schedule {lr_schedule} differs from the session's "
                f"{config.lr_schedule}; a session's schedule is fixed at creation",
            )
        missing = sorted(set(config.tensors) - set(tensors))
        if missing:
            raise EngineError("invalid_state", f"state is missing tensors {missing}")
        unknown = sorted(set(tensors) - set(config.tensors))
        if unknown:
            raise EngineError("unknown_tensor", f"the session has no tensors {unknown}")
        layout = stepped_layout(config.algorithm, config.hyperparameters)
        checked: dict[str, tuple[Any, TensorState]] = {}
        for name, entry in tensors.items():
            shape = config.tensors[name]
            if "param" not in entry:
                raise EngineError("invalid_state", f"tensor {name!r} has no param")
            state = {k: v for k, v in entry.items() if k != "param"}
            checked_state = check_tensor_state(name, state, shape, layout)
            cls._check_known(config, {name: np.asarray(entry["param"])})
            checked[name] = (entry["param"], checked_state)
        if schedule_state is not None:
            schedule = ScheduleState.from_dict(schedule_state)
        elif optimizer is not None and "lr" in optimizer:
            # torch's load_state_dict sets group["lr"]: the next step uses it (as PATCH)
            schedule = schedule.with_lr(config.hyperparameters["lr"])
        return config, checked, schedule

    @staticmethod
    def _decode_params(
        snap: Snapshot, config: SessionConfig, names, consume: bool = False
    ) -> dict[str, np.ndarray]:
        """Params as arrays; with `consume` the stored bytes leave the snapshot as they go."""
        take = snap.arrays.pop if consume else snap.arrays.__getitem__
        return {
            name: array_from_bytes(take((name, "param")), config.tensors[name]) for name in names
        }


def _reject_non_finite(arrays: Mapping[str, np.ndarray], what: str) -> None:
    """Parameters must be finite: a NaN would poison every later step of every worker."""
    bad = find_non_finite(arrays)
    if bad:
        raise EngineError(
            "non_finite", f"non-finite values (NaN or inf) in {what}: {', '.join(bad)}", tensors=bad
        )


def check_if_match(if_match: int | None, current: int) -> None:
    """An `If-Match` version must be the session's: both engines answer a mismatch alike."""
    if if_match is not None and if_match != current:
        raise EngineError(
            "precondition_failed",
            f"If-Match {if_match} but the session is at version {current}",
            version=current,
        )


def check_adopted_version(version: int | None, current: int) -> None:
    """A state imported with its own version must be past the session's: versions never go
    back (a restore continues the checkpoint's count)."""
    if version is not None and version <= current:
        raise EngineError(
            "invalid_state",
            f"the state's version {version} is not past the session's {current}; "
            "versions never go back",
            version=current,
        )
