"""HotSessionService: the session service with each session hot in the memory of its owner.

What changes against the write-through engine (SessionService, which this extends):
- Ownership: one process at a time owns a session through a lease in Redis (store/hot_log.py)
  carrying a fencing token; the owner renews it every `lease_ms / 3`. A process that cannot
  confirm its lease within `lease_ms * LEASE_MARGIN` of the last renewal stops serving the
  session from memory (and the append script's fencing check refuses its writes anyway).
- A push is applied in memory and then appended to the session's log (gradients, lr, schedule,
  version, idempotency records: one fenced script, plus WAITAOF with fsync=always); it is
  acknowledged only after that append returned. If the append fails, the in-memory session is
  dropped (it may be ahead of the log) and reloaded from Redis by the next request.
- Every `snapshot_steps` log entries or `snapshot_s` seconds, the owner copies its arrays under
  the session lock (a memcpy, milliseconds) and writes them as the new snapshot off the hot path;
  the same script trims the log entries the snapshot covers.
- PATCH is a log entry; PUT params and PUT state write a snapshot before they are acknowledged.
- Takeover (no live lease): load the snapshot, replay the log after it (state.py): bit-identical.
- The meta hash stays current (version, config, schedule, updated_at are set by the append
  script), so reading a session, listing, and long-poll (version events) work on any replica
  exactly as with the write-through engine; everything that needs the arrays runs at the owner
  (api/forward.py sends such requests there).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import weakref
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

import numpy as np
import orjson
from anyio import to_thread

from ...optim.schedules import ScheduleState
from ...store import keys
from ...store.errors import IdempotencyConflict, SessionGone, StoreUnavailable
from ...store.hot_log import FencedOff, Holder, HotLog, LogConfig, LogPush, StoreBehind
from ...store.keys import SNAPSHOT_FIELD, TTL_FIELD
from ...store.redis_store import KEEP, RedisStore
from ..arrays import ParamsOut, copies
from ..errors import EngineError, not_found
from ..pushes import PushRequest, PushResult, run_pushes
from ..session_config import SessionConfig
from ..sessions import (
    ParamsResult,
    SessionService,
    _now,
    _reject_non_finite,
    check_adopted_version,
    check_if_match,
)
from .state import CorruptLog, HotSession, decode_snapshot, replay

log = logging.getLogger("optserve.hot")

#: The owner serves from memory for this fraction of the lease after its last confirmed renewal
#: (the rest absorbs the renewal's round trip and clock-rate differences between processes).
LEASE_MARGIN = 0.8
#: How many log entries a replay reads per round trip (bounds the gradients held at once).
REPLAY_PAGE = 8
#: A batch whose append lost an idempotency race reloads and plans again this often.
APPLY_ATTEMPTS = 4
#: A session nobody used for this long is snapshotted and let go (its memory freed; the next
#: request to any replica takes it over from that snapshot, with no log to replay).
IDLE_RELEASE_S = 120.0


class _Fenced(Exception):
    """A batch's append was fenced off (nothing written): try it again after a reload."""


class NotOwner(EngineError):
    """Another live process owns the session; `url` is where it serves."""

    def __init__(self, sid: str, url: str) -> None:
        super().__init__(
            "owner_unavailable", f"session {sid!r} is served by another replica; try again"
        )
        self.url = url


def owner_unavailable(sid: str) -> EngineError:
    return EngineError(
        "owner_unavailable", f"session {sid!r} is changing owner; try again", retry_after=1
    )


def _json(value: Any) -> str:
    return orjson.dumps(value).decode()


class HotSessionService(SessionService):
    """Sessions kept in memory by their owner, logged to Redis before each acknowledgement."""

    def __init__(
        self,
        store: RedisStore,
        *,
        log: HotLog,
        owner_id: str,
        url: str,
        lease_ms: int = 2_000,
        snapshot_steps: int = 32,
        snapshot_s: float = 5.0,
        **options: Any,
    ) -> None:
        super().__init__(store, **options)
        self.log = log
        self.owner_id = owner_id
        self.url = url
        self.lease_ms = lease_ms
        self.snapshot_steps = snapshot_steps
        self.snapshot_s = snapshot_s
        self._hot: dict[str, HotSession] = {}
        self._loads: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()
        self._renewer: asyncio.Task | None = None

    def start(self) -> None:
        self._renewer = asyncio.create_task(self._renew_loop(), name="optserve-hot-leases")

    async def close(self, wait_s: float = 30.0) -> None:
        """Let queued pushes commit (the base class), stop renewing, let the snapshots in
        flight finish, give every lease back (another replica takes over at once instead of
        after the lease expires)."""
        await super().close(wait_s=wait_s)
        if self._renewer is not None:
            self._renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._renewer
        for hs in list(self._hot.values()):
            with contextlib.suppress(Exception):
                if hs.snapshot_task is not None:
                    await asyncio.wait_for(hs.snapshot_task, 10)
            with contextlib.suppress(Exception):
                await self.log.release(hs.sid, hs.holder)
            self._drop(hs)

    # -- ownership -------------------------------------------------------------------------------

    async def route(
        self, sid: str, *, forwarded: bool = False, dead_url: str | None = None
    ) -> str | None:
        """None: serve `sid` here (this process owns it now); else the owner's URL.

        A request that was already forwarded is never forwarded again (no loops): it is served
        here, or refused with 503 if the lease moved meanwhile. `dead_url`: the owner there did
        not answer; wait for its lease to lapse (at most `lease_ms`) and take over.
        """
        hs = self._hot.get(sid)
        if hs is not None and not hs.lost and time.monotonic() < hs.lease_until:
            return None
        if dead_url is not None:
            deadline = time.monotonic() + self.lease_ms / 1000 + 1.0
            while time.monotonic() < deadline:
                holder = await self.log.holder(sid)
                if holder is None or holder.url != dead_url:
                    break
                await asyncio.sleep(0.05)
        try:
            await self._own(sid)
        except NotOwner as other:
            if other.url == self.url and dead_url is None:
                # the lease names this address but not this process: an earlier incarnation
                # (SIGKILLed and restarted on its port); no use forwarding to ourselves
                return await self.route(sid, forwarded=forwarded, dead_url=self.url)
            return None if forwarded else other.url
        return None

    async def _own(self, sid: str) -> HotSession:
        """The session, owned and loaded here; NotOwner if another process holds it."""
        hs = self._hot.get(sid)
        if (
            hs is not None
            and not hs.lost
            and (time.monotonic() < hs.lease_until or await self._renew_one(hs))
        ):
            return hs
        lock = self._loads.get(sid)
        if lock is None:
            lock = self._loads[sid] = asyncio.Lock()
        async with lock:
            hs = self._hot.get(sid)
            if hs is not None and not hs.lost and time.monotonic() < hs.lease_until:
                return hs
            started = time.monotonic()
            try:
                status, holder = await self.log.acquire(sid, self.owner_id, self.url, self.lease_ms)
            except SessionGone:
                raise not_found(sid) from None
            if status == 0:
                raise NotOwner(sid, holder.url)
            hs = await self._load(sid, holder)
            hs.lease_until = started + self.lease_ms / 1000 * LEASE_MARGIN
            self._hot[sid] = hs
            return hs

    async def _renew_one(self, hs: HotSession) -> bool:
        started = time.monotonic()
        try:
            renewed = await self.log.renew(hs.sid, hs.holder, self.lease_ms)
        except StoreUnavailable:
            return False
        if renewed:
            hs.lease_until = started + self.lease_ms / 1000 * LEASE_MARGIN
        else:
            self._drop(hs)
        return renewed

    def _drop(self, hs: HotSession) -> None:
        """Stop serving this session from memory (the next request reloads it from Redis)."""
        hs.lost = True
        if self._hot.get(hs.sid) is hs:
            del self._hot[hs.sid]

    async def _renew_loop(self) -> None:
        while True:
            await asyncio.sleep(self.lease_ms / 3000)
            for hs in list(self._hot.values()):
                try:
                    if await self._renew_one(hs):
                        self._maybe_snapshot(hs)
                        await self._release_if_idle(hs)
                except Exception as error:  # never let one session stop the renewals
                    log.warning("lease renewal of %s: %s", hs.sid, error)

    async def _release_if_idle(self, hs: HotSession) -> None:
        """Let go of a session unused for IDLE_RELEASE_S once its log is in a snapshot."""
        if time.monotonic() - hs.used_at < IDLE_RELEASE_S or hs.lock.locked():
            return
        if hs.logged or hs.snap_lock.locked():
            return  # _maybe_snapshot (time-based) has it covered: let go next round
        self._drop(hs)
        await self.log.release(hs.sid, hs.holder)
        log.info("let go of idle session %s at version %d", hs.sid, hs.version)

    # -- recovery --------------------------------------------------------------------------------

    async def _load(self, sid: str, holder: Holder) -> HotSession:
        """Newest snapshot plus the log after it: the session exactly as last acknowledged."""
        try:
            meta = await self.store.read_meta(sid)
            snap = await self.store.read(sid, params=None, state_of=list(meta.manifests))
        except SessionGone:
            raise not_found(sid) from None
        info = orjson.loads(snap.meta[SNAPSHOT_FIELD]) if SNAPSHOT_FIELD in snap.meta else None
        if info is None:  # never owned yet (created here, or by the write-through engine)
            config = self.config_of(snap)
            info = {"version": snap.version, "log_id": "0-0", "schedule": None}
            schedule_data = orjson.loads(snap.meta["schedule"])
        else:
            config = SessionConfig.from_json(info["config"])
            schedule_data = info["schedule"]
        params, states = await to_thread.run_sync(
            decode_snapshot, config, snap.arrays, snap.manifests
        )
        snap.arrays.clear()
        hs = HotSession(
            sid=sid,
            holder=holder,
            config=config,
            schedule=ScheduleState.from_dict(schedule_data),
            version=info["version"],
            params=params,
            states=states,
            snap_version=info["version"],
            manifests={k: dict(v) for k, v in snap.manifests.items()},
            last_id=info["log_id"],
            ttl_ms=int(snap.meta[TTL_FIELD]) if snap.meta.get(TTL_FIELD) else None,
        )
        after = hs.last_id
        while entries := await self.log.read(sid, after, REPLAY_PAGE):
            await to_thread.run_sync(replay, hs, entries)
            after = entries[-1].id
        if hs.version != snap.version:
            raise CorruptLog(f"{sid}: replayed to {hs.version}, the session is at {snap.version}")
        if SNAPSHOT_FIELD not in snap.meta:
            renew = self._renew_keys(hs) if hs.ttl_ms is not None else None
            await self.log.write_snapshot(
                sid, holder, {}, hs.manifests, hs.snapshot_field(), [], at=hs.version, renew=renew
            )
        else:
            await self._touch(hs)
        log.info("took over %s at version %d (%d log entries)", sid, hs.version, len(hs.logged))
        return hs

    # -- snapshots -------------------------------------------------------------------------------

    def _maybe_snapshot(self, hs: HotSession) -> None:
        if hs.lost or not hs.logged or (hs.snapshot_task and not hs.snapshot_task.done()):
            return
        due = len(hs.logged) >= self.snapshot_steps
        due = due or time.monotonic() - hs.snapshot_at >= self.snapshot_s
        if due:
            hs.snapshot_task = asyncio.create_task(self._snapshot(hs))

    async def _snapshot(self, hs: HotSession) -> None:
        """Copy under the lock (pushes wait a memcpy), write outside it (pushes go on).

        A session with a TTL writes under the lock too: the snapshot renews the expiry of
        every key the session has, so no append may change that set meanwhile.
        """
        async with hs.snap_lock:
            async with hs.lock:
                if hs.lost:
                    return
                arrays = await to_thread.run_sync(hs.snapshot_arrays)
                version, covered, field = hs.version, list(hs.logged), hs.snapshot_field()
                if hs.ttl_ms is not None:
                    await self._write_snapshot(hs, arrays, version, covered, field)
                    return
            await self._write_snapshot(hs, arrays, version, covered, field)

    async def _write_snapshot(
        self,
        hs: HotSession,
        arrays: dict[str, dict[str, Any]],
        version: int,
        covered: list[tuple[str, list[str]]],
        field: str,
    ) -> None:
        renew = None
        if hs.ttl_ms is not None:
            renew = [key for _, keys_ in hs.logged[len(covered) :] for key in keys_]
        try:
            hs.manifests = await self.log.write_snapshot(
                hs.sid, hs.holder, arrays, hs.manifests, field, covered, at=version, renew=renew
            )
        except (FencedOff, StoreBehind):
            self._drop(hs)
            return
        except Exception as error:  # the log still has everything: try again later
            log.warning("snapshot of %s failed: %s", hs.sid, error)
            hs.snapshot_at = time.monotonic()
            return
        hs.snap_version = version
        hs.snapshot_at = time.monotonic()
        del hs.logged[: len(covered)]

    def _renew_keys(self, hs: HotSession, *, always: bool = False) -> list[str]:
        """Every array and logged gradient key of a session with a TTL (each use renews them
        all with the meta, so none expires first); nothing for a session without one."""
        if hs.ttl_ms is None and not always:
            return []
        arrays = [
            keys.array_key(hs.sid, tensor, name, index)
            for tensor, counts in hs.manifests.items()
            for name, count in counts.items()
            for index in range(count)
        ]
        logged = [key for _, keys_ in hs.logged for key in keys_]
        return [keys.fence_key(hs.sid), *arrays, *logged]

    async def _touch(self, hs: HotSession) -> bool:
        """Any use renews a TTL (under the session lock: the key set is stable). False: the
        session expired in Redis (the memory copy is dropped)."""
        if hs.ttl_ms is None or await self.log.touch(hs.sid, hs.version, self._renew_keys(hs)):
            return True
        self._drop(hs)
        return False

    async def _write_now(
        self, hs: HotSession, meta: Mapping[str, str], old: int, version: int
    ) -> None:
        """A snapshot that is the write itself (PUT params/state): acknowledged after it."""
        arrays = await to_thread.run_sync(hs.snapshot_arrays)
        hs.manifests = await self.log.write_snapshot(
            hs.sid, hs.holder, arrays, hs.manifests, hs.snapshot_field(), list(hs.logged),
            meta, at=old, version=version, renew=[] if hs.ttl_ms is not None else None,
        )  # fmt: skip
        hs.snap_version = version
        hs.snapshot_at = time.monotonic()
        hs.logged.clear()

    # -- pushes ----------------------------------------------------------------------------------

    async def _apply_batch(
        self, sid: str, pushes: Sequence[PushRequest]
    ) -> list[PushResult | BaseException]:
        """Plan and run the batch in memory, append it to the log (one fenced round trip), then
        answer. Until the append returned nobody sees the new arrays (the lock is held)."""
        for _ in range(APPLY_ATTEMPTS):
            hs = await self._own(sid)
            async with hs.lock:
                if hs.lost:
                    continue
                try:
                    results = await self._apply_locked(hs, pushes)
                except (IdempotencyConflict, _Fenced):
                    # nothing was written: a record landed meanwhile (a sync round), or the lease
                    # lapsed (a stalled process); reload and plan again, here if the session is
                    # still ours to take (else NotOwner: 503, for the client to retry)
                    continue
            if results is not None:
                self._maybe_snapshot(hs)
                return results
        raise owner_unavailable(sid)

    async def _apply_locked(
        self, hs: HotSession, pushes: Sequence[PushRequest]
    ) -> list[PushResult | BaseException] | None:
        sid = hs.sid
        plan = await self._plan(sid, hs.config, pushes)
        config, version = hs.config, hs.version
        try:
            run = await to_thread.run_sync(
                lambda: run_pushes(
                    config, pushes, plan, hs.params, hs.states, hs.schedule, version,
                    copy_last=True,
                )
            )  # fmt: skip
            if run.applied or run.records:
                outcomes = run.outcomes
                entries = [
                    LogPush(outcomes[i].version, lr, _json(after.to_dict()), plan.grads[i])
                    for i, lr, after in run.steps
                ]
                meta = {"updated_at": _now()}
                if run.applied:
                    meta["schedule"] = _json(run.schedule.to_dict())
                started = time.monotonic()
                appended = await self.log.append(
                    sid,
                    hs.holder,
                    entries,
                    meta,
                    at=version,
                    version=version + run.applied if run.applied else None,
                    idempotency=run.records,
                    idempotency_ttl_ms=int(self.idempotency_ttl_s * 1000),
                    renew=self._renew_keys(hs),
                    lease_ms=self.lease_ms,
                )
                hs.lease_until = max(hs.lease_until, started + self.lease_ms / 1000 * LEASE_MARGIN)
                hs.logged += appended
                if appended:
                    hs.last_id = appended[-1][0]
                if run.applied:
                    hs.version = version + run.applied
                    hs.schedule = run.schedule
                    self.metrics.updates_applied.labels(config.mode.get("type", "async")).inc(
                        run.applied
                    )
                    self.metrics.group_commit_updates.observe(run.applied)
        except BaseException as error:
            # memory may be ahead of the log (or the log of memory): reload before serving again
            self._drop(hs)
            if isinstance(error, StoreBehind):
                log.error("%s: the store lost acknowledged writes; reloading from it", sid)
            if isinstance(error, FencedOff):
                raise _Fenced from None
            raise self._mapped(sid, error) from None
        return plan.finish(pushes, run, hs.params, hs.version)

    # -- reads and writes that need the arrays ---------------------------------------------------

    @contextlib.asynccontextmanager
    async def _locked(self, sid: str, *, snapshots: bool = False) -> AsyncIterator[HotSession]:
        """The owned session under its lock (and its snapshot lock first, for a write that is
        a snapshot), reloaded if it was dropped while we waited; a use, so a TTL is renewed
        (and an expired session is 404 even if its copy is still in memory)."""
        for _ in range(APPLY_ATTEMPTS):
            hs = await self._own(sid)
            async with contextlib.AsyncExitStack() as stack:
                if snapshots:
                    await stack.enter_async_context(hs.snap_lock)
                await stack.enter_async_context(hs.lock)
                if hs.lost:
                    continue
                if not await self._touch(hs):
                    raise not_found(sid)
                yield hs
                return
        raise owner_unavailable(sid)

    async def get_params(
        self, sid: str, names: list[str] | None = None, out: ParamsOut | None = None
    ) -> ParamsResult:
        async with self._locked(sid) as hs:
            for name in names or ():
                if name not in hs.config.tensors:
                    raise EngineError("unknown_tensor", f"the session has no tensor {name!r}")
            chosen = names if names is not None else list(hs.params)
            params = await to_thread.run_sync(copies, hs.params, chosen, out)
            return ParamsResult(hs.version, params)

    async def get(self, sid: str) -> dict[str, Any]:
        """The session's view (its meta is current on every replica), here at its owner, so
        that the read renews a TTL on every key (api/forward.py sends it here)."""
        async with self._locked(sid):
            pass
        return self.view(await self._meta(sid))

    async def export_state(self, sid: str) -> dict[str, Any]:
        async with self._locked(sid) as hs:

            def copy() -> dict[str, dict[str, Any]]:
                tensors: dict[str, dict[str, Any]] = {}
                for name in hs.config.tensors:
                    entry: dict[str, Any] = {"param": hs.params[name].copy()}
                    for key, value in hs.states.get(name, {}).items():
                        entry[key] = float(value) if np.ndim(value) == 0 else value.copy()
                    tensors[name] = entry
                return tensors

            return {
                "version": hs.version,
                "optimizer": hs.config.optimizer_view,
                "lr_schedule": hs.config.lr_schedule,
                "lr_schedule_state": hs.schedule.to_dict(),
                "tensors": await to_thread.run_sync(copy),
            }

    async def patch(self, sid: str, changes: Mapping[str, Any]) -> dict[str, Any]:
        """A config change is a log entry: replay applies later pushes with the new config."""
        self._check_patch(changes)
        ttl_ms = self.lifetime.ttl_ms(changes, creating=False) if "ttl_s" in changes else KEEP
        async with self._locked(sid) as hs:
            config, schedule = self.patched(hs.config, hs.schedule, changes)
            entry = LogConfig(hs.version, _json(config.to_json()), _json(schedule.to_dict()))
            meta = {"config": entry.config, "schedule": entry.schedule, "updated_at": _now()}
            ttl = "" if ttl_ms is KEEP else "none" if ttl_ms is None else str(ttl_ms)
            renew = self._renew_keys(hs, always=bool(ttl))
            try:
                appended = await self.log.append(
                    sid, hs.holder, [entry], meta, at=hs.version, version=None,
                    renew=renew, ttl=ttl, lease_ms=self.lease_ms,
                )  # fmt: skip
            except BaseException as error:
                self._drop(hs)
                raise self._mapped(sid, error) from None
            hs.config, hs.schedule, hs.last_id = config, schedule, appended[-1][0]
            hs.logged += appended
            if ttl:
                hs.ttl_ms = ttl_ms
        return await self.get(sid)

    async def put_params(
        self, sid: str, params: Mapping[str, np.ndarray], if_match: int | None
    ) -> int:
        async with self._locked(sid, snapshots=True) as hs:
            self._check_known(hs.config, params)
            _reject_non_finite(params, "params")
            check_if_match(if_match, hs.version)
            try:
                for name, array in params.items():
                    hs.params[name] = np.array(array, dtype=np.float32, order="C")
                hs.version += 1
                await self._write_now(hs, {"updated_at": _now()}, hs.version - 1, hs.version)
            except BaseException as error:
                self._drop(hs)
                raise self._mapped(sid, error) from None
            return hs.version

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
        async with self._locked(sid, snapshots=True) as hs:
            check_if_match(if_match, hs.version)
            check_adopted_version(version, hs.version)
            config, checked, schedule = self.prepared_import(
                hs.config, hs.schedule, tensors, optimizer, schedule_state, lr_schedule
            )
            try:
                hs.config, hs.schedule = config, schedule
                for name, (param, state) in checked.items():
                    hs.params[name] = np.array(param, dtype=np.float32, order="C")
                    if state:
                        hs.states[name] = state
                    else:
                        hs.states.pop(name, None)
                old, hs.version = hs.version, hs.version + 1 if version is None else version
                meta = {
                    "config": _json(config.to_json()),
                    "schedule": _json(schedule.to_dict()),
                    "updated_at": _now(),
                }
                await self._write_now(hs, meta, old, hs.version)
            except BaseException as error:
                self._drop(hs)
                raise self._mapped(sid, error) from None
            return hs.version

    async def delete(self, sid: str) -> None:
        async with self._locked(sid, snapshots=True) as hs:
            self._modes.pop(sid, None)
            gradient_keys = [key for _, keys_ in hs.logged for key in keys_]
            self._drop(hs)
            tenant = await self.tenancy.owner(sid)
            if not await self.store.delete(sid):
                raise not_found(sid)
            await self.log.delete(sid, gradient_keys)
            if tenant is not None:
                await self.tenancy.drop(tenant, sid)  # after the session: see store/tenants.py

    @staticmethod
    def _mapped(sid: str, error: BaseException) -> BaseException:
        if isinstance(error, FencedOff | StoreBehind):
            return owner_unavailable(sid)
        if isinstance(error, SessionGone):
            return not_found(sid)
        return error
