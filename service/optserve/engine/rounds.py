"""Sync-mode rounds: pushes gather into rounds of N, the mean gradient is applied once per round,
and every pusher of the round gets the same version and params back (a barrier).

The round lives in Redis, not in the process, so workers may hit different replicas. A push
writes its gradients with plain SETs under its own random token (no multi-MB value ever passes
through Lua), then `round_join.lua` registers it in the open round atomically: the round is
still open, the worker is new to it, the count goes up. Exactly one process applies a round:
the push that completes it, or at the deadline the first waiter whose `round_close.lua` closes
it. The applier holds a lease (a key with a TTL it keeps refreshing) while it runs, stores the
result, and `round_settle.lua` marks the round settled and PUBLISHes its number; the other
pushers sleep on one pattern subscription per process and read the stored result when woken,
so every replica returns identical bytes (read once per process, however many of its pushers
wait), and the last pusher served deletes the result arrays (`round_ack.lua`). A waiter checks
Redis itself only when its timer fires: at the round's deadline, and after that when the
applier's lease would run out.

Failure behaviour: a round with too few pushes at its deadline fails (`round_timeout`) and
nothing is applied; an `apply` that raises fails the round with that error for every waiter; an
applier that dies (its lease lapses) fails the round for its waiters, who cannot tell whether
its step was committed. Key names are in store/round_keys.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import secrets
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, TypeVar

import numpy as np
import orjson
import redis.asyncio as aioredis
from anyio import to_thread
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisClusterException, RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ..metrics import Metrics
from ..optim.errors import OptimError
from ..store import round_keys as rk
from ..store.cluster import is_outage, open_pubsub, queue_script, same_node, with_scripts
from ..store.errors import StoreUnavailable
from .arrays import LE_F32, to_bytes
from .errors import EngineError, invalid_session

log = logging.getLogger("optserve.rounds")

T = TypeVar("T")

#: Bounds on a sync mode: a round of more pushes than this is a configuration mistake.
MAX_WORKERS = 10_000
MAX_TIMEOUT_S = 86_400.0
#: The round pointer outlives any round; it expires a week after the session's last push.
POINTER_TTL_MS = 7 * 86_400_000
#: A settled round's result stays readable this many round timeouts (and at least 10 s), for a
#: pusher that missed the announcement and looks at its deadline; once every pusher of the round
#: has its result the arrays are deleted at once (round_ack.lua), so fast rounds of a big model
#: do not pile up results for minutes.
RESULT_TTL_TIMEOUTS = 3.0
MIN_RESULT_TTL_S = 10.0
#: How long an open round, its pushes and a running apply may live past the deadline + grace.
OPEN_TTL_MARGIN_S = 60.0
#: The applier reads gradients in pipelines of about this many bytes (bounds its memory).
READ_BATCH_BYTES = 64 << 20
#: A join retries when the open round moved under it; this many times at most.
MAX_MOVES = 64

_SCRIPTS = resources.files(__package__)


def _script(name: str) -> str:
    return _SCRIPTS.joinpath(name).read_text()


# -- the interface ----------------------------------------------------------------------------


@dataclass(frozen=True)
class RoundSpec:
    """A session's sync mode: rounds of `workers` pushes, closed after `timeout_s` with at least
    `min_workers` pushes (fewer: the round fails with round_timeout)."""

    workers: int
    timeout_s: float
    min_workers: int

    @classmethod
    def from_mode(cls, mode: Mapping) -> RoundSpec:
        """Validate `{"type": "sync", "workers": N, "timeout_s": 60, "min_workers": N}`."""
        if not isinstance(mode, Mapping) or mode.get("type") != "sync":
            raise invalid_session('a sync mode is {"type": "sync", "workers": N, ...}')
        unknown = set(mode) - {"type", "workers", "timeout_s", "min_workers"}
        if unknown:
            raise invalid_session(f"unknown sync mode fields: {', '.join(sorted(unknown))}")
        workers = _count(mode.get("workers"), "workers", 1, MAX_WORKERS)
        timeout = mode.get("timeout_s", 60.0)
        if (
            isinstance(timeout, bool)
            or not isinstance(timeout, int | float)
            or not math.isfinite(timeout)
            or not 0 < timeout <= MAX_TIMEOUT_S
        ):
            raise invalid_session(f'"timeout_s" must be a number in (0, {MAX_TIMEOUT_S:g}]')
        minimum = _count(mode.get("min_workers", workers), "min_workers", 1, workers)
        return cls(workers, float(timeout), minimum)

    def to_mode(self) -> dict[str, Any]:
        return {
            "type": "sync",
            "workers": self.workers,
            "timeout_s": self.timeout_s,
            "min_workers": self.min_workers,
        }


def _count(value: Any, name: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise invalid_session(f'"{name}" must be an integer from {low} to {high}')
    return value


@dataclass(frozen=True)
class RoundResult:
    round: int
    version: int
    #: the params right after this round's step: identical for every pusher of the round
    params: dict[str, np.ndarray]
    #: how many pushes the round applied
    workers: int


#: apply(round_number, mean_grads, n_pushes) -> (new_version, params_after); the session service
#: runs the optimizer step and commits it atomically.
ApplyRound = Callable[
    [int, dict[str, np.ndarray], int], Awaitable[tuple[int, dict[str, np.ndarray]]]
]


# -- internal records -------------------------------------------------------------------------


@dataclass(frozen=True)
class _Failure:
    """A failed round as stored in Redis; each waiter raises its own EngineError from it."""

    code: str
    detail: str
    extra: Mapping[str, Any] = field(default_factory=dict)

    def error(self, number: int) -> EngineError:
        extra = {k: v for k, v in self.extra.items() if k not in ("code", "detail")}
        return EngineError(self.code, self.detail, **{"round": number, **extra})


Outcome = RoundResult | _Failure


@dataclass(frozen=True)
class _Ticket:
    """A registered push that waits: its round and the time left until the round's deadline."""

    round: int
    remaining_s: float


@dataclass(frozen=True)
class _Push:
    """One registered push as the applier reads it back: token and tensor shapes."""

    token: str
    shapes: dict[str, tuple[int, ...]]


@dataclass(frozen=True)
class _Pending:
    """The round is not settled yet; look again in `wait_s` (deadline or lease still ahead)."""

    wait_s: float


@dataclass(eq=False)
class _Waiter:
    """One in-process pusher waiting for its round; the listener and local appliers wake it."""

    event: asyncio.Event = field(default_factory=asyncio.Event)
    #: round numbers announced on the session's channel since it started waiting
    seen: set[int] = field(default_factory=set)
    #: set after the subscription reconnected: a message may have been missed
    resync: bool = False
    round: int | None = None
    #: True while this process applies the waiter's round: the outcome comes in-process
    local: bool = False
    outcome: Outcome | None = None


@dataclass(frozen=True)
class _Timing:
    """TTLs in milliseconds that follow from a spec and the coordinator's settings."""

    open_ms: int
    result_ms: int
    lease_ms: int

    @classmethod
    def of(cls, spec: RoundSpec, grace_s: float, lease_s: float) -> _Timing:
        result_s = max(RESULT_TTL_TIMEOUTS * spec.timeout_s, MIN_RESULT_TTL_S)
        open_s = spec.timeout_s + grace_s + OPEN_TTL_MARGIN_S
        return cls(_ms(open_s), _ms(result_s), _ms(lease_s))


def _ms(seconds: float) -> int:
    return max(1, math.ceil(seconds * 1000))


# -- the coordinator --------------------------------------------------------------------------


class RoundCoordinator:
    """Sync rounds of every session, for one process; many processes may share one Redis.

    `lease_s`: how long an applier that stopped refreshing its lease counts as alive.
    `apply_grace_s`: how long past its round's deadline a pusher keeps waiting for a round
    that a live process is still applying.
    """

    def __init__(
        self,
        client: aioredis.Redis | RedisCluster,
        *,
        lease_s: float = 5.0,
        apply_grace_s: float = 120.0,
        subscribe_timeout_s: float = 10.0,
        metrics: Metrics | None = None,
    ) -> None:
        self._client = client
        self.metrics = metrics or Metrics(process=False)
        self.lease_s = lease_s
        self.apply_grace_s = apply_grace_s
        self.subscribe_timeout_s = subscribe_timeout_s
        self._join = client.register_script(_script("round_join.lua"))
        self._close = client.register_script(_script("round_close.lua"))
        self._settle = client.register_script(_script("round_settle.lua"))
        self._ack_script = client.register_script(_script("round_ack.lua"))
        self._reads: dict[tuple[str, int], asyncio.Task] = {}
        self._waiters: dict[str, set[_Waiter]] = {}
        self._tasks: set[asyncio.Task] = set()
        self._listener: asyncio.Task | None = None
        self._ready: asyncio.Event | None = None
        self._subscriptions = 0
        self._closed = False

    # -- public ------------------------------------------------------------------------------

    async def join(
        self,
        sid: str,
        worker: str | None,
        grads: Mapping[str, np.ndarray],
        spec: RoundSpec,
        apply: ApplyRound,
    ) -> RoundResult:
        """Add this push to the session's open round; return once the round is applied.

        Raises EngineError: duplicate_in_round, round_timeout, or the error `apply` raised for
        the round (its applier gets the original exception; other pushers an EngineError with
        the code the API gives that exception). Cancelling the caller does not
        withdraw the push, and never interrupts a registration or an apply under way.
        """
        if self._closed:
            raise RuntimeError("the round coordinator is closed")
        waiter = _Waiter()
        with self._watching(sid, waiter):
            await self._subscribed()
            entered = await self._shielded(self._enter(sid, worker, grads, spec, apply, waiter))
            if isinstance(entered, _Ticket):
                entered = await self._await_round(sid, entered, waiter, spec, apply)
        await self._ack(sid, entered)
        return entered

    async def close(self, *, wait_s: float = 30.0) -> None:
        """Let registrations and applies under way finish (up to `wait_s`), then stop.

        An apply still running after `wait_s` is cancelled: its lease lapses and its round's
        waiters on other processes fail it as if this process had died.
        """
        self._closed = True
        pending = set(self._tasks)
        if pending:
            _, late = await asyncio.wait(pending, timeout=wait_s)
            await _cancel(late)
        if self._listener is not None:
            await _cancel({self._listener})
            self._listener = None

    # -- entering a round --------------------------------------------------------------------

    async def _enter(
        self,
        sid: str,
        worker: str | None,
        grads: Mapping[str, np.ndarray],
        spec: RoundSpec,
        apply: ApplyRound,
        waiter: _Waiter,
    ) -> RoundResult | _Ticket:
        """Write the gradients, register the push; apply the round if this push completed it."""
        timing = self._timing(spec)
        token = secrets.token_hex(8)
        member = f"w:{worker}" if worker is not None else f"a:{token}"
        blobs = {name: to_bytes(array) for name, array in grads.items()}
        manifest = orjson.dumps(
            {"t": token, "g": {name: list(np.shape(a)) for name, a in grads.items()}}
        ).decode()
        pointer = await self._write_push(sid, token, blobs, timing)
        try:
            reply = await self._register(sid, pointer, member, manifest, spec, timing, token)
        except EngineError:
            await self._forget(sid, [_Push(token, {name: () for name in blobs})])
            raise
        number, action, count, remaining_ms = reply
        waiter.round = number
        if action == "apply":
            return await self._apply(sid, number, count, token, apply, timing)
        return _Ticket(number, remaining_ms / 1000)

    async def _write_push(
        self, sid: str, token: str, blobs: Mapping[str, bytes], timing: _Timing
    ) -> int:
        """SET the gradients (plain SETs: no big value through Lua) and read the round pointer,
        in one round trip."""

        async def run() -> list:
            async with self._client.pipeline(transaction=False) as pipe:
                for name, data in blobs.items():
                    pipe.set(rk.round_grad_key(sid, token, name), data, px=timing.open_ms)
                pipe.get(rk.round_pointer_key(sid))
                return await pipe.execute()

        replies = await _guard(run)
        return int(replies[-1] or 1)

    async def _register(
        self,
        sid: str,
        number: int,
        member: str,
        manifest: str,
        spec: RoundSpec,
        timing: _Timing,
        token: str,
    ) -> tuple[int, str, int, int]:
        """Run round_join.lua until it agrees on the open round: (round, action, count, ms)."""
        for _ in range(MAX_MOVES):
            reply = await _guard(
                lambda number=number: self._join(
                    keys=self._round_keys(sid, number),
                    args=[
                        number,
                        member,
                        manifest,
                        spec.workers,
                        spec.min_workers,
                        _ms(spec.timeout_s),
                        timing.open_ms,
                        timing.lease_ms,
                        POINTER_TTL_MS,
                        token,
                    ],
                )
            )
            kind = _text(reply[0])
            if kind == "moved":
                number = int(reply[1])
                continue
            if kind == "duplicate":
                name = member[2:]
                raise EngineError(
                    "duplicate_in_round",
                    f"worker {name!r} already pushed into round {number}",
                    round=number,
                    worker=name,
                )
            return number, kind, int(reply[2]), int(reply[3])
        raise EngineError("conflict", "the open round kept moving; try again")

    @staticmethod
    def _round_keys(sid: str, number: int) -> list[str]:
        return [
            rk.round_pointer_key(sid),
            rk.round_key(sid, number),
            rk.round_workers_key(sid, number),
            rk.round_lease_key(sid, number),
        ]

    # -- waiting -----------------------------------------------------------------------------

    async def _await_round(
        self, sid: str, ticket: _Ticket, waiter: _Waiter, spec: RoundSpec, apply: ApplyRound
    ) -> RoundResult:
        """Sleep until the round is announced settled; at the deadline try to close it; past the
        deadline keep waiting for a live applier, at most `apply_grace_s`."""
        loop = asyncio.get_running_loop()
        number = ticket.round
        wake_at = loop.time() + ticket.remaining_s
        give_up = wake_at + self.apply_grace_s
        while True:
            if await self._sleep(waiter, number, wake_at):
                outcome = waiter.outcome or await self._read_outcome(sid, number)
                if outcome is not None:
                    return _deliver(outcome, number)
                continue
            step = await self._shielded(self._at_deadline(sid, number, spec, apply))
            if not isinstance(step, _Pending):
                return _deliver(step, number)
            now = loop.time()
            if now >= give_up:
                raise EngineError(
                    "round_timeout",
                    f"round {number} was still being applied {self.apply_grace_s:g} s after "
                    "its deadline",
                    round=number,
                )
            wake_at = min(now + step.wait_s, give_up)

    async def _sleep(self, waiter: _Waiter, number: int, wake_at: float) -> bool:
        """True when there is news of round `number` (or a possibly missed message), False
        when `wake_at` came first."""
        loop = asyncio.get_running_loop()
        while True:
            waiter.event.clear()
            if waiter.outcome is not None:
                return True
            if not waiter.local and (number in waiter.seen or waiter.resync):
                waiter.seen.discard(number)
                waiter.resync = False
                return True
            remaining = wake_at - loop.time()
            if remaining <= 0:
                return False
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(waiter.event.wait(), remaining)

    async def _at_deadline(
        self, sid: str, number: int, spec: RoundSpec, apply: ApplyRound
    ) -> Outcome | _Pending:
        """The waiter's timer fired: close the round (and apply it, or fail it), or learn that
        it is still being applied, or that it settled and the message was missed."""
        timing = self._timing(spec)
        token = secrets.token_hex(8)
        reply = await _guard(
            lambda: self._close(
                keys=[
                    rk.round_pointer_key(sid),
                    rk.round_key(sid, number),
                    rk.round_lease_key(sid, number),
                ],
                args=[
                    number,
                    token,
                    timing.lease_ms,
                    timing.result_ms,
                    rk.rounds_channel(sid),
                    POINTER_TTL_MS,
                ],
            )
        )
        kind = _text(reply[0])
        if kind == "apply":
            return await self._apply(sid, number, int(reply[1]), token, apply, timing)
        if kind in ("early", "applying"):
            # the lease is refreshed every third of its life: look again just after it would lapse
            return _Pending(int(reply[1]) / 1000 + 0.05)
        if kind in ("timeout", "orphaned"):
            await self._forget(sid, await self._pushes(sid, number), number)
        outcome = await self._read_outcome(sid, number)
        return outcome or _Failure("round_timeout", f"round {number} expired before it settled")

    # -- applying ----------------------------------------------------------------------------

    async def _apply(
        self, sid: str, number: int, count: int, token: str, apply: ApplyRound, timing: _Timing
    ) -> RoundResult:
        """Mean the round's gradients, run `apply`, store and announce the outcome.

        Runs shielded from the caller's cancellation; the lease is refreshed meanwhile so
        waiters elsewhere know this process is alive.
        """
        self._expect_local(sid, number)
        stop = asyncio.Event()
        beat = asyncio.create_task(self._heartbeat(sid, number, timing, stop))
        outcome: Outcome = _Failure("round_timeout", f"round {number} was not applied")
        pushes: list[_Push] = []
        try:
            try:
                pushes = await self._pushes(sid, number)
                mean = await self._mean(sid, number, pushes)
                version, params = await apply(number, mean, count)
                result = RoundResult(number, int(version), _float32(params), count)
            except Exception as error:
                outcome = _failure_of(error, number)
                await self._settle_failed(sid, number, token, outcome, timing)
                raise
            outcome = result
            await self._settle_done(sid, number, token, result, timing)
            return result
        finally:
            stop.set()
            beat.cancel()
            self._hand_local(sid, number, outcome)
            with contextlib.suppress(StoreUnavailable, RedisError):
                await self._forget(sid, pushes, number)

    async def _pushes(self, sid: str, number: int) -> list[_Push]:
        """The round's registered pushes, in a canonical order (by worker id), so the mean does
        not depend on arrival order even where float64 sums round."""
        raw = await _guard(lambda: self._client.hgetall(rk.round_workers_key(sid, number)))
        pushes = []
        for member in sorted(raw):
            manifest = orjson.loads(raw[member])
            shapes = {name: tuple(shape) for name, shape in manifest["g"].items()}
            pushes.append(_Push(manifest["t"], shapes))
        return pushes

    async def _mean(self, sid: str, number: int, pushes: Sequence[_Push]) -> dict[str, np.ndarray]:
        """Per tensor, the mean over the pushes that sent it: summed in float64, divided once,
        rounded once to float32.

        That is the correctly rounded mean whenever the float64 sum is exact and leaves
        log2(n) bits spare, i.e. per element the n values span fewer than about
        29 - 2*log2(n) binades (25 for n = 4); beyond that it can be one float32 ulp off, and
        is still the same whatever the arrival order, since pushes are summed sorted by worker.
        """
        names: dict[str, tuple[int, ...]] = {}
        for push in pushes:
            for name, shape in push.shapes.items():
                if names.setdefault(name, shape) != shape:
                    raise EngineError(
                        "shape_mismatch",
                        f"round {number}: pushes disagree on the shape of {name!r}",
                        tensor=name,
                    )
        mean: dict[str, np.ndarray] = {}
        for batch in _batches(names, len(pushes)):
            blobs = await self._read_grads(sid, number, pushes, batch)
            mean.update(await to_thread.run_sync(_average, blobs, names))
        return mean

    async def _read_grads(
        self, sid: str, number: int, pushes: Sequence[_Push], names: Sequence[str]
    ) -> dict[str, list[bytes]]:
        wanted = {
            name: [rk.round_grad_key(sid, p.token, name) for p in pushes if name in p.shapes]
            for name in names
        }

        async def run() -> list:
            async with self._client.pipeline(transaction=False) as pipe:
                for keys in wanted.values():
                    pipe.execute_command("MGET", *keys)  # pipe.mget: not on a cluster
                return await pipe.execute()

        replies = await _guard(run)
        blobs = dict(zip(wanted, replies, strict=True))
        for values in blobs.values():
            if any(value is None for value in values):
                raise EngineError(
                    "round_timeout", f"gradients of round {number} expired before it was applied"
                )
        return blobs

    async def _heartbeat(self, sid: str, number: int, timing: _Timing, stop: asyncio.Event) -> None:
        """Keep the lease alive while this process applies the round.

        Stops on `stop` as well as on cancellation: Python 3.11's wait_for (inside redis-py)
        can swallow a cancel, and a heartbeat that outlived its apply would keep the round's
        waiters waiting for a result that never comes.
        """
        every = max(timing.lease_ms / 3000, 0.01)
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), every)
            if stop.is_set():
                return
            try:
                await self._client.pexpire(rk.round_lease_key(sid, number), timing.lease_ms)
            except (RedisError, OSError) as error:
                log.warning("round %s of %s: lease refresh failed: %s", number, sid, error)

    async def _settle_done(
        self, sid: str, number: int, token: str, result: RoundResult, timing: _Timing
    ) -> None:
        """Write the params with plain SETs, then mark the round done and announce it, in one
        round trip; a settle refused (the lease lapsed) is logged, the step stands."""
        shapes = {name: list(array.shape) for name, array in result.params.items()}
        fields = ["version", result.version, "result", orjson.dumps(shapes).decode()]

        async def run() -> list:
            async with self._client.pipeline(transaction=False) as pipe:
                for name, array in result.params.items():
                    pipe.set(
                        rk.round_result_key(sid, number, name), to_bytes(array), px=timing.result_ms
                    )
                # when the round opened and the time now, both on the store's clock (the round's
                # pushers may have come through other replicas with other clocks)
                pipe.hget(rk.round_key(sid, number), "opened")
                pipe.execute_command(
                    "TIME", **await same_node(self._client, rk.round_key(sid, number))
                )
                await queue_script(
                    pipe,
                    self._settle,
                    [rk.round_key(sid, number), rk.round_lease_key(sid, number)],
                    [token, "done", timing.result_ms, rk.rounds_channel(sid), number, *fields],
                )
                return await pipe.execute()

        *_, opened, now, reply = await _guard(
            lambda: with_scripts(self._client, [self._settle], run)
        )
        if opened is not None:
            seconds, micros = now
            elapsed = seconds + micros / 1e6 - int(opened) / 1000
            self.metrics.round_seconds.observe(max(0.0, elapsed))
        if _text(reply[0]) != "ok":
            log.warning(
                "round %s of %s was applied (version %s) but had been failed as %s: its lease "
                "lapsed",
                number,
                sid,
                result.version,
                _text(reply[0]),
            )

    async def _settle_failed(
        self, sid: str, number: int, token: str, failure: _Failure, timing: _Timing
    ) -> None:
        extra = orjson.dumps(dict(failure.extra), default=str).decode()
        fields = ["code", failure.code, "detail", failure.detail, "extra", extra]
        with contextlib.suppress(StoreUnavailable):
            # unreachable store: the lease lapses and the waiters fail the round themselves
            await _guard(
                lambda: self._settle(
                    keys=[rk.round_key(sid, number), rk.round_lease_key(sid, number)],
                    args=[
                        token,
                        "failed",
                        timing.result_ms,
                        rk.rounds_channel(sid),
                        number,
                        *fields,
                    ],
                )
            )

    async def _forget(self, sid: str, pushes: Sequence[_Push], number: int | None = None) -> None:
        """Delete the gradients of these pushes (and the round's worker list)."""
        doomed = [rk.round_grad_key(sid, p.token, name) for p in pushes for name in p.shapes]
        if number is not None:
            doomed.append(rk.round_workers_key(sid, number))
        if doomed:
            await _guard(lambda: self._client.unlink(*doomed))

    # -- reading outcomes --------------------------------------------------------------------

    async def _ack(self, sid: str, result: RoundResult) -> None:
        """Count this pusher as served; the last one deletes the round's result arrays."""
        names = [rk.round_result_key(sid, result.round, name) for name in result.params]
        with contextlib.suppress(StoreUnavailable, RedisError):
            await _guard(lambda: self._ack_script(keys=[rk.round_key(sid, result.round), *names]))

    async def _read_outcome(self, sid: str, number: int) -> Outcome | None:
        """The stored outcome, read once per process however many of its pushers wait for it
        (a round's params can be megabytes)."""
        key = (sid, number)
        task = self._reads.get(key)
        if task is None:
            task = asyncio.create_task(self._fetch_outcome(sid, number))
            self._reads[key] = task
            task.add_done_callback(lambda done: self._finish_read(key, done))
        return await asyncio.shield(task)

    def _finish_read(self, key: tuple[str, int], task: asyncio.Task) -> None:
        if self._reads.get(key) is task:
            del self._reads[key]
        if not task.cancelled():
            task.exception()  # retrieved: every reader may have gone away

    async def _fetch_outcome(self, sid: str, number: int) -> Outcome | None:
        """The settled outcome stored in Redis, or None while the round is unsettled."""
        fields = ("state", "version", "result", "applied", "code", "detail", "extra")
        raw = await _guard(lambda: self._client.hmget(rk.round_key(sid, number), fields))
        state, version, result, applied, code, detail, extra = (
            _text(v) if v is not None else None for v in raw
        )
        if state is None:
            return _Failure("round_timeout", f"round {number} expired before it settled")
        if state == "failed":
            return _Failure(code or "internal_error", detail or "", orjson.loads(extra or "{}"))
        if state != "done":
            return None
        shapes = orjson.loads(result or "{}")
        names = list(shapes)
        keys = [rk.round_result_key(sid, number, name) for name in names]
        blobs = await _guard(lambda: self._client.mget(keys)) if keys else []
        if any(blob is None for blob in blobs):
            return _Failure("round_timeout", f"the result of round {number} expired")
        params = {
            name: np.frombuffer(blob, dtype=LE_F32).astype(np.float32).reshape(shapes[name])
            for name, blob in zip(names, blobs, strict=True)
        }
        return RoundResult(number, int(version or 0), params, int(applied or 0))

    # -- in-process waiters and the subscription --------------------------------------------

    @contextlib.contextmanager
    def _watching(self, sid: str, waiter: _Waiter) -> Iterator[None]:
        """Registered before the push is: no announcement of its round can be missed."""
        self._waiters.setdefault(sid, set()).add(waiter)
        try:
            yield
        finally:
            waiters = self._waiters.get(sid)
            if waiters is not None:
                waiters.discard(waiter)
                if not waiters:
                    del self._waiters[sid]

    def _expect_local(self, sid: str, number: int) -> None:
        """This process applies the round: its own waiters get the outcome in memory instead
        of reading megabytes back from Redis."""
        for waiter in self._waiters.get(sid, ()):
            if waiter.round == number:
                waiter.local = True

    def _hand_local(self, sid: str, number: int, outcome: Outcome) -> None:
        for waiter in self._waiters.get(sid, ()):
            if waiter.round == number:
                waiter.outcome = outcome
                waiter.local = False
                waiter.event.set()

    def _announce(self, channel: bytes | str, data: bytes | str) -> None:
        sid = rk.sid_of_channel(channel)
        try:
            number = int(data)
        except ValueError:
            return
        for waiter in self._waiters.get(sid or "", ()):
            waiter.seen.add(number)
            waiter.event.set()

    def _resync_all(self) -> None:
        for waiters in self._waiters.values():
            for waiter in waiters:
                waiter.resync = True
                waiter.event.set()

    async def _subscribed(self) -> None:
        """Start the listener if needed and wait until its subscription is confirmed."""
        if self._ready is None:
            self._ready = asyncio.Event()
        if self._listener is None or self._listener.done():
            self._listener = asyncio.create_task(self._listen(), name="optserve-rounds")
        if self._ready.is_set():
            return
        try:
            await asyncio.wait_for(self._ready.wait(), self.subscribe_timeout_s)
        except TimeoutError:
            raise StoreUnavailable("cannot subscribe to round notifications") from None

    async def _listen(self) -> None:
        """One pattern subscription for every session's rounds channel; reconnects forever."""
        assert self._ready is not None
        delay = 0.1
        while True:
            pubsub = None
            try:
                pubsub = await open_pubsub(self._client)
                await pubsub.psubscribe(rk.ROUNDS_PATTERN)
                async for message in pubsub.listen():
                    kind = message.get("type")
                    if kind == "pmessage":
                        self._announce(message["channel"], message["data"])
                    elif kind == "psubscribe":
                        self._confirmed()
                        delay = 0.1
            except asyncio.CancelledError:
                raise
            except Exception as error:
                log.warning("round notifications: %s; reconnecting in %.1fs", error, delay)
            finally:
                self._ready.clear()
                if pubsub is not None:
                    with contextlib.suppress(Exception):
                        await pubsub.aclose()
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)

    def _confirmed(self) -> None:
        """Subscribed (again): after a reconnect every waiter re-reads, a message may be lost."""
        assert self._ready is not None
        self._ready.set()
        self._subscriptions += 1
        if self._subscriptions > 1:
            self._resync_all()

    # -- helpers -----------------------------------------------------------------------------

    def _timing(self, spec: RoundSpec) -> _Timing:
        return _Timing.of(spec, self.apply_grace_s, self.lease_s)

    async def _shielded(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run `coro` as its own task so a cancelled request cannot cut a registration or an
        apply in half (the round's other pushers depend on it)."""
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._finished)
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            caller = asyncio.current_task()
            if task.cancelled() and caller is not None and not caller.cancelling():
                # close() cut the task off, not our caller's own cancellation: answer it
                raise EngineError(
                    "round_timeout",
                    "the server stopped before the round settled; its step may or may not "
                    "have been applied",
                ) from None
            raise

    def _finished(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved: the caller may have gone away


async def _cancel(tasks: set[asyncio.Task], *, patience_s: float = 0.5, tries: int = 20) -> None:
    """Cancel tasks and wait for them, cancelling again if one swallowed it: on Python 3.11 a
    cancel that races a completing `asyncio.wait_for` (redis-py uses it when it reconnects and
    sends) is lost, and a single cancel could then wait forever on a blocking read."""
    pending = {task for task in tasks if not task.done()}
    for _ in range(tries):
        if not pending:
            return
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=patience_s)
    log.warning("%d round task(s) did not stop when cancelled", len(pending))


def _batches(names: Mapping[str, tuple[int, ...]], pushes: int) -> Iterator[list[str]]:
    """Group tensors so one pipelined read holds about READ_BATCH_BYTES of gradients."""
    batch: list[str] = []
    size = 0
    for name, shape in names.items():
        nbytes = 4 * int(np.prod(shape, dtype=np.int64)) * pushes
        if batch and size + nbytes > READ_BATCH_BYTES:
            yield batch
            batch, size = [], 0
        batch.append(name)
        size += nbytes
    if batch:
        yield batch


def _average(
    blobs: Mapping[str, list[bytes]], shapes: Mapping[str, tuple[int, ...]]
) -> dict[str, np.ndarray]:
    """Float64 sum in the given order, one division, one rounding to float32."""
    mean = {}
    for name, values in blobs.items():
        total = np.zeros(shapes[name], dtype=np.float64)
        for blob in values:
            total += np.frombuffer(blob, dtype=LE_F32).reshape(shapes[name])
        total /= len(values)
        mean[name] = total.astype(np.float32)
    return mean


def _float32(params: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The params as float32 arrays: exactly what is stored, so every pusher sees the same."""
    return {name: np.asarray(array, dtype=np.float32) for name, array in params.items()}


def _failure_of(error: Exception, number: int) -> _Failure:
    """What the round's waiters hear when `apply` raised: the same code the API would give the
    applier for that error (its own pusher gets the original exception)."""
    if isinstance(error, EngineError):
        return _Failure(error.code, error.detail, error.extra)
    if isinstance(error, OptimError):
        extra = {a: getattr(error, a) for a in ("tensor", "tensors") if hasattr(error, a)}
        return _Failure(error.code, str(error), extra)
    if isinstance(error, StoreUnavailable):
        return _Failure("store_unavailable", f"round {number}: the store is unreachable: {error}")
    return _Failure(
        "internal_error", f"round {number} could not be applied ({type(error).__name__})"
    )


def _deliver(outcome: Outcome, number: int) -> RoundResult:
    if isinstance(outcome, _Failure):
        raise outcome.error(number)
    return outcome


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


async def _guard(call: Callable[[], Awaitable[T]]) -> T:
    """Run a Redis call; connection failures become StoreUnavailable (the API's 503)."""
    try:
        return await call()
    except (RedisConnectionError, RedisTimeoutError, OSError) as error:
        raise StoreUnavailable(str(error)) from error
    except (RedisError, RedisClusterException) as error:
        if is_outage(error):
            raise StoreUnavailable(str(error)) from error
        raise
