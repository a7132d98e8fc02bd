"""Sync-mode rounds against a real valkey-server: barriers, exact means, timeouts, duplicates,
failed applies, several coordinators (as several replicas) sharing rounds, and key cleanup."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Mapping
from fractions import Fraction

import numpy as np
import pytest
import redis
import redis.asyncio as aioredis

from optserve.engine.errors import EngineError
from optserve.engine.rounds import RoundCoordinator, RoundResult, RoundSpec
from optserve.store import keys
from optserve.store import round_keys as rk

pytestmark = pytest.mark.anyio

SID = "sess-1"


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.fixture
async def make_coordinator(redis_url):
    """Coordinators each on their own Redis client, as separate replicas would be."""
    made: list[tuple[RoundCoordinator, aioredis.Redis]] = []

    def make(**options) -> RoundCoordinator:
        client = aioredis.Redis.from_url(redis_url)
        coordinator = RoundCoordinator(client, **options)
        made.append((coordinator, client))
        return coordinator

    yield make
    for coordinator, client in made:
        await coordinator.close(wait_s=5)
        await client.aclose()


class Model:
    """A stand-in for the session service's apply: params -= mean, its own version counter,
    every call recorded."""

    def __init__(self, params: Mapping[str, np.ndarray], *, delay: float = 0.0) -> None:
        self.params = {name: np.asarray(p, np.float32).copy() for name, p in params.items()}
        self.version = 0
        self.delay = delay
        self.fail: Exception | None = None
        self.hang = False
        self.calls: list[tuple[int, dict[str, np.ndarray], int]] = []

    async def __call__(
        self, number: int, mean: dict[str, np.ndarray], pushes: int
    ) -> tuple[int, dict[str, np.ndarray]]:
        self.calls.append((number, {k: v.copy() for k, v in mean.items()}, pushes))
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.hang:
            await asyncio.Event().wait()
        if self.fail is not None:
            raise self.fail
        for name, grad in mean.items():
            self.params[name] = (self.params[name] - grad).astype(np.float32)
        self.version += 1
        return self.version, {name: p.copy() for name, p in self.params.items()}


def nearest_f32(value: Fraction) -> np.float32:
    """The float32 nearest to an exact rational, ties to even."""
    guess = np.float32(float(value))
    candidates = [
        np.nextafter(guess, np.float32(-np.inf)),
        guess,
        np.nextafter(guess, np.float32(np.inf)),
    ]
    return min(
        candidates,
        key=lambda c: (abs(Fraction(float(c)) - value), int(np.array(c).view(np.uint32)) & 1),
    )


def exact_mean(arrays: list[np.ndarray]) -> np.ndarray:
    """The correctly rounded float32 mean, computed with exact rationals."""
    flat = [np.asarray(a, np.float32).ravel() for a in arrays]
    out = [
        nearest_f32(sum((Fraction(float(a[i])) for a in flat), Fraction(0)) / len(flat))
        for i in range(flat[0].size)
    ]
    return np.array(out, np.float32).reshape(np.shape(arrays[0]))


def grad(seed: int, shape=(3, 5)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    signs = rng.choice([-1.0, 1.0], size=shape)
    return (signs * rng.uniform(0.25, 4.0, size=shape)).astype(np.float32)


def session_keys(redis_url: str, sid: str = SID) -> dict[bytes, int]:
    """Every key of the session with its PTTL (-1: no expiry)."""
    client = redis.Redis.from_url(redis_url)
    try:
        found = sorted(client.scan_iter(match=f"{keys.session_tag(sid)}:*"))
        return {key: client.pttl(key) for key in found}
    finally:
        client.close()


def assert_same(results: list[RoundResult]) -> None:
    first = results[0]
    for result in results[1:]:
        assert (result.round, result.version, result.workers) == (
            first.round,
            first.version,
            first.workers,
        )
        assert result.params.keys() == first.params.keys()
        for name, array in first.params.items():
            assert result.params[name].dtype == np.float32
            assert result.params[name].tobytes() == array.tobytes()


def assert_no_round_leftovers(redis_url: str) -> None:
    """Gradients, worker lists, leases and (every pusher served) result arrays are gone; what
    stays (the small round hashes and the round pointer) expires."""
    leftovers = session_keys(redis_url)
    for key, ttl in leftovers.items():
        assert re.fullmatch(rb"optserve:\{sess-1\}:(round|r:\d+)", key), key
        assert ttl > 0, key


# -- spec -----------------------------------------------------------------------------------------


def test_spec_defaults_and_round_trip():
    spec = RoundSpec.from_mode({"type": "sync", "workers": 4})
    assert spec == RoundSpec(workers=4, timeout_s=60.0, min_workers=4)
    assert RoundSpec.from_mode(spec.to_mode()) == spec
    assert RoundSpec.from_mode(
        {"type": "sync", "workers": 3, "timeout_s": 0.5, "min_workers": 1}
    ) == RoundSpec(3, 0.5, 1)


@pytest.mark.parametrize(
    "mode",
    [
        {"type": "async"},
        {"type": "sync"},
        {"type": "sync", "workers": 0},
        {"type": "sync", "workers": True},
        {"type": "sync", "workers": 2.0},
        {"type": "sync", "workers": 2, "timeout_s": 0},
        {"type": "sync", "workers": 2, "timeout_s": float("nan")},
        {"type": "sync", "workers": 2, "timeout_s": "60"},
        {"type": "sync", "workers": 2, "min_workers": 3},
        {"type": "sync", "workers": 2, "min_workers": 0},
        {"type": "sync", "workers": 2, "extra": 1},
        ["sync"],
    ],
)
def test_spec_rejects_bad_modes(mode):
    with pytest.raises(EngineError) as caught:
        RoundSpec.from_mode(mode)
    assert caught.value.code == "invalid_session"


# -- rounds ---------------------------------------------------------------------------------------


async def test_four_workers_five_rounds_one_exact_step_each(make_coordinator, redis_url):
    coordinator = make_coordinator()
    model = Model({"w": np.zeros((3, 5)), "b": np.ones(2)})
    spec = RoundSpec(workers=4, timeout_s=10, min_workers=4)
    sent: dict[tuple[int, int], dict[str, np.ndarray]] = {}

    async def worker(index: int) -> list[RoundResult]:
        results = []
        for step in range(5):
            grads = {"w": grad(100 * step + index), "b": grad(1000 + 100 * step + index, (2,))}
            sent[(index, step)] = grads
            results.append(await coordinator.join(SID, f"w{index}", grads, spec, model))
        return results

    per_worker = await asyncio.gather(*(worker(i) for i in range(4)))
    assert len(model.calls) == 5
    for step, (number, mean, pushes) in enumerate(model.calls):
        assert (number, pushes) == (step + 1, 4)
        for name in ("w", "b"):
            expected = exact_mean([sent[(i, step)][name] for i in range(4)])
            assert mean[name].dtype == np.float32
            assert mean[name].tobytes() == expected.tobytes()
    for step in range(5):
        of_round = [results[step] for results in per_worker]
        assert_same(of_round)
        assert (of_round[0].round, of_round[0].version, of_round[0].workers) == (step + 1,) * 2 + (
            4,
        )
    final = per_worker[0][-1].params
    assert all(final[n].tobytes() == model.params[n].tobytes() for n in model.params)
    assert_no_round_leftovers(redis_url)


async def test_mean_of_three_is_correctly_rounded(make_coordinator):
    """Three pushes: the division is inexact, and the result is still the nearest float32."""
    coordinator = make_coordinator()
    model = Model({"w": np.zeros(64)})
    spec = RoundSpec(workers=3, timeout_s=10, min_workers=3)
    grads = [grad(seed, (64,)) for seed in range(3)]
    await asyncio.gather(
        *(coordinator.join(SID, f"w{i}", {"w": g}, spec, model) for i, g in enumerate(grads))
    )
    assert model.calls[0][1]["w"].tobytes() == exact_mean(grads).tobytes()


async def test_two_replicas_share_rounds(make_coordinator, redis_url):
    replicas = [make_coordinator(), make_coordinator()]
    model = Model({"w": np.zeros((3, 5))})
    spec = RoundSpec(workers=4, timeout_s=10, min_workers=4)

    async def worker(index: int) -> list[RoundResult]:
        coordinator = replicas[index % 2]
        results = []
        for step in range(3):
            grads = {"w": grad(10 * step + index)}
            results.append(await coordinator.join(SID, f"w{index}", grads, spec, model))
        return results

    per_worker = await asyncio.gather(*(worker(i) for i in range(4)))
    assert [call[0] for call in model.calls] == [1, 2, 3]
    for step in range(3):
        assert_same([results[step] for results in per_worker])
        assert per_worker[0][step].version == step + 1
    assert_no_round_leftovers(redis_url)


async def test_duplicate_worker_in_a_round_is_refused(make_coordinator, redis_url):
    coordinator = make_coordinator()
    model = Model({"w": np.zeros(4)})
    spec = RoundSpec(workers=2, timeout_s=10, min_workers=2)
    first = asyncio.create_task(coordinator.join(SID, "a", {"w": np.ones(4)}, spec, model))
    await asyncio.sleep(0.2)
    with pytest.raises(EngineError) as caught:
        await coordinator.join(SID, "a", {"w": np.full(4, 100.0)}, spec, model)
    assert caught.value.code == "duplicate_in_round"
    assert caught.value.extra["round"] == 1
    assert not first.done()
    second = await coordinator.join(SID, "b", {"w": np.full(4, 3.0)}, spec, model)
    assert_same([await first, second])
    assert model.calls[0][1]["w"].tolist() == [2.0] * 4  # the refused push is not in the mean
    assert model.calls[0][2] == 2
    assert_no_round_leftovers(redis_url)


async def test_anonymous_workers_are_never_duplicates(make_coordinator):
    coordinator = make_coordinator()
    model = Model({"w": np.zeros(2)})
    spec = RoundSpec(workers=2, timeout_s=10, min_workers=2)
    results = await asyncio.gather(
        coordinator.join(SID, None, {"w": np.ones(2)}, spec, model),
        coordinator.join(SID, None, {"w": np.ones(2) * 3}, spec, model),
    )
    assert_same(results)
    assert model.calls[0][1]["w"].tolist() == [2.0, 2.0]


async def test_timeout_with_enough_pushes_applies_what_it_has(make_coordinator, redis_url):
    replicas = [make_coordinator(), make_coordinator()]
    model = Model({"w": np.zeros(3)})
    spec = RoundSpec(workers=4, timeout_s=0.5, min_workers=2)
    grads = [np.full(3, float(i + 1)) for i in range(3)]
    loop = asyncio.get_running_loop()
    started = loop.time()
    results = await asyncio.gather(
        *(replicas[i % 2].join(SID, f"w{i}", {"w": g}, spec, model) for i, g in enumerate(grads))
    )
    assert loop.time() - started >= 0.45
    assert len(model.calls) == 1  # one closer, though waiters on two replicas hit the deadline
    assert model.calls[0][2] == 3
    assert model.calls[0][1]["w"].tolist() == [2.0, 2.0, 2.0]
    assert_same(results)
    assert results[0].workers == 3 and results[0].version == 1
    assert_no_round_leftovers(redis_url)


async def test_timeout_below_min_workers_fails_round_and_next_round_works(
    make_coordinator, redis_url
):
    replicas = [make_coordinator(), make_coordinator()]
    model = Model({"w": np.zeros(3)})
    spec = RoundSpec(workers=4, timeout_s=0.5, min_workers=3)
    outcomes = await asyncio.gather(
        *(replicas[i].join(SID, f"w{i}", {"w": np.ones(3)}, spec, model) for i in range(2)),
        return_exceptions=True,
    )
    for outcome in outcomes:
        assert isinstance(outcome, EngineError) and outcome.code == "round_timeout"
        assert outcome.extra["round"] == 1
    assert model.calls == []
    assert_no_round_leftovers(redis_url)

    results = await asyncio.gather(
        *(replicas[i % 2].join(SID, f"w{i}", {"w": np.ones(3)}, spec, model) for i in range(4))
    )
    assert_same(results)
    assert (results[0].round, results[0].version, results[0].workers) == (2, 1, 4)


async def test_apply_error_reaches_every_waiter(make_coordinator, redis_url):
    replicas = [make_coordinator(), make_coordinator()]
    model = Model({"w": np.zeros(2)})
    model.fail = EngineError("non_finite", "the mean gradient is not finite", tensors=["w"])
    spec = RoundSpec(workers=3, timeout_s=10, min_workers=3)
    outcomes = await asyncio.gather(
        *(replicas[i % 2].join(SID, f"w{i}", {"w": np.ones(2)}, spec, model) for i in range(3)),
        return_exceptions=True,
    )
    assert len(model.calls) == 1
    for outcome in outcomes:
        assert isinstance(outcome, EngineError)
        assert (outcome.code, outcome.detail) == ("non_finite", "the mean gradient is not finite")
        assert outcome.extra["tensors"] == ["w"]

    model.fail = ValueError("kaboom")  # not an EngineError: the applier gets it as it is
    outcomes = await asyncio.gather(
        *(replicas[i % 2].join(SID, f"w{i}", {"w": np.ones(2)}, spec, model) for i in range(3)),
        return_exceptions=True,
    )
    assert sum(isinstance(o, ValueError) for o in outcomes) == 1
    others = [o for o in outcomes if not isinstance(o, ValueError)]
    assert all(isinstance(o, EngineError) and o.code == "internal_error" for o in others)
    assert all("ValueError" in o.detail and o.extra["round"] == 2 for o in others)
    assert_no_round_leftovers(redis_url)

    model.fail = None
    results = await asyncio.gather(
        *(replicas[i % 2].join(SID, f"w{i}", {"w": np.ones(2)}, spec, model) for i in range(3))
    )
    assert_same(results)
    assert (results[0].round, results[0].version) == (3, 1)


async def test_tensors_sent_by_some_pushers_are_averaged_over_those(make_coordinator, redis_url):
    coordinator = make_coordinator()
    model = Model({"w": np.zeros(2), "b": np.zeros(1), "c": np.zeros(()), "d": np.zeros(1)})
    spec = RoundSpec(workers=3, timeout_s=10, min_workers=3)
    pushes = [
        {"w": np.array([1.0, 2.0]), "b": np.array([10.0])},
        {"w": np.array([3.0, 7.0])},
        {"b": np.array([20.0]), "c": np.array(5.0)},
    ]
    results = await asyncio.gather(
        *(coordinator.join(SID, f"w{i}", g, spec, model) for i, g in enumerate(pushes))
    )
    _, mean, count = model.calls[0]
    assert count == 3
    assert set(mean) == {"w", "b", "c"}  # "d" was sent by nobody: not stepped
    assert mean["w"].tolist() == [2.0, 4.5]
    assert mean["b"].tolist() == [15.0]
    assert mean["c"].shape == () and float(mean["c"]) == 5.0
    assert_same(results)
    assert results[0].params["d"].tolist() == [0.0]
    assert_no_round_leftovers(redis_url)


async def test_slow_apply_past_the_deadline_is_waited_for(make_coordinator, redis_url):
    """A waiter on another replica outlives its deadline while a live process applies."""
    replicas = [make_coordinator(lease_s=0.3), make_coordinator(lease_s=0.3)]
    model = Model({"w": np.zeros(2)}, delay=1.2)
    spec = RoundSpec(workers=2, timeout_s=0.3, min_workers=2)
    waiting = asyncio.create_task(replicas[0].join(SID, "a", {"w": np.ones(2)}, spec, model))
    await asyncio.sleep(0.1)
    applier = await replicas[1].join(SID, "b", {"w": np.ones(2)}, spec, model)
    assert_same([await waiting, applier])
    assert len(model.calls) == 1
    assert_no_round_leftovers(redis_url)


async def test_dead_applier_fails_its_round_for_the_waiters(make_coordinator, redis_url):
    """The applying process stops (its apply is cut off, its lease lapses): waiters elsewhere
    get round_timeout instead of hanging, and the session's next round works."""
    doomed = make_coordinator(lease_s=0.3)
    survivor = make_coordinator(lease_s=0.3)
    model = Model({"w": np.zeros(2)})
    model.hang = True
    spec = RoundSpec(workers=2, timeout_s=0.3, min_workers=2)
    waiting = asyncio.create_task(survivor.join(SID, "a", {"w": np.ones(2)}, spec, model))
    await asyncio.sleep(0.1)
    applying = asyncio.create_task(doomed.join(SID, "b", {"w": np.ones(2)}, spec, model))
    while not model.calls:
        await asyncio.sleep(0.01)
    await doomed.close(wait_s=0)  # cancels the apply, as a crash would stop it
    with pytest.raises(EngineError) as caught:
        await asyncio.wait_for(waiting, 5)
    assert caught.value.code == "round_timeout"
    with pytest.raises(EngineError) as caught:
        await applying
    assert caught.value.code == "round_timeout"
    assert_no_round_leftovers(redis_url)

    model.hang = False
    results = await asyncio.gather(
        *(survivor.join(SID, f"w{i}", {"w": np.ones(2)}, spec, model) for i in range(2))
    )
    assert (results[0].round, results[0].version) == (2, 1)


async def test_cancelled_pusher_still_counts(make_coordinator):
    """A pusher that goes away (client disconnect) leaves its push in the round."""
    coordinator = make_coordinator()
    model = Model({"w": np.zeros(2)})
    spec = RoundSpec(workers=2, timeout_s=10, min_workers=2)
    gone = asyncio.create_task(coordinator.join(SID, "a", {"w": np.ones(2)}, spec, model))
    await asyncio.sleep(0.2)
    gone.cancel()
    result = await coordinator.join(SID, "b", {"w": np.full(2, 3.0)}, spec, model)
    assert result.workers == 2
    assert model.calls[0][1]["w"].tolist() == [2.0, 2.0]


async def test_sessions_have_independent_rounds(make_coordinator):
    coordinator = make_coordinator()
    models = {sid: Model({"w": np.zeros(1)}) for sid in ("s-a", "s-b")}
    spec = RoundSpec(workers=2, timeout_s=10, min_workers=2)
    results = await asyncio.gather(
        *(
            coordinator.join(sid, f"w{i}", {"w": np.full(1, float(i))}, spec, models[sid])
            for sid in models
            for i in range(2)
        )
    )
    assert all(len(m.calls) == 1 for m in models.values())
    assert_same(results[:2])
    assert_same(results[2:])


def test_round_keys_share_the_session_slot():
    tag = keys.session_tag(SID)
    names = [
        rk.round_pointer_key(SID),
        rk.round_key(SID, 3),
        rk.round_workers_key(SID, 3),
        rk.round_lease_key(SID, 3),
        rk.round_result_key(SID, 3, "layer:0.weight"),
        rk.round_grad_key(SID, "abc", "x"),
        rk.rounds_channel(SID),
    ]
    assert all(name.startswith(tag + ":") for name in names)
    assert rk.sid_of_channel(rk.rounds_channel(SID).encode()) == SID


async def test_waiters_of_one_process_read_the_result_once(make_coordinator, redis_url):
    """Three pushers on one replica, the round applied on another: one read of the params."""
    waiting_replica, applying_replica = make_coordinator(), make_coordinator()
    model = Model({"w": np.zeros(1000)})
    spec = RoundSpec(workers=4, timeout_s=10, min_workers=4)
    waiting = [
        asyncio.create_task(waiting_replica.join(SID, f"w{i}", {"w": np.ones(1000)}, spec, model))
        for i in range(3)
    ]
    await asyncio.sleep(0.2)
    admin = aioredis.Redis.from_url(redis_url)
    try:
        await admin.config_resetstat()
        applied = await applying_replica.join(SID, "w3", {"w": np.ones(1000)}, spec, model)
        assert_same([applied, *await asyncio.gather(*waiting)])
        stats = await admin.info("commandstats")
    finally:
        await admin.aclose()
    assert stats["cmdstat_mget"]["calls"] == 2  # the applier's gradients, the waiters' result
    assert stats["cmdstat_hmget"]["calls"] == 1  # the waiters' one look at the round: no polling
    assert_no_round_leftovers(redis_url)


async def test_result_of_a_pusher_that_went_away_expires(make_coordinator, redis_url):
    coordinator = make_coordinator()
    model = Model({"w": np.zeros(2)})
    spec = RoundSpec(workers=2, timeout_s=10, min_workers=2)
    gone = asyncio.create_task(coordinator.join(SID, "a", {"w": np.ones(2)}, spec, model))
    await asyncio.sleep(0.2)
    gone.cancel()
    await coordinator.join(SID, "b", {"w": np.ones(2)}, spec, model)
    results = {k: v for k, v in session_keys(redis_url).items() if b":p:" in k}
    assert list(results) == [rk.round_result_key(SID, 1, "w").encode()]
    assert 0 < results[rk.round_result_key(SID, 1, "w").encode()] <= 30_000


async def test_rounds_survive_a_lost_subscription(make_coordinator, redis_url):
    """The pub/sub connections drop while a pusher waits: it still gets its round's result
    (re-read after the reconnect, or at its deadline), and later rounds are announced."""
    replicas = [make_coordinator(), make_coordinator()]
    model = Model({"w": np.zeros(2)})
    spec = RoundSpec(workers=2, timeout_s=1.0, min_workers=2)
    waiting = asyncio.create_task(replicas[0].join(SID, "a", {"w": np.ones(2)}, spec, model))
    await asyncio.sleep(0.2)
    admin = aioredis.Redis.from_url(redis_url)
    try:
        assert await admin.client_kill_filter(_type="pubsub") >= 1
    finally:
        await admin.aclose()
    applied = await replicas[1].join(SID, "b", {"w": np.ones(2)}, spec, model)
    assert_same([applied, await asyncio.wait_for(waiting, 5)])
    results = await asyncio.gather(
        *(replicas[i].join(SID, f"w{i}", {"w": np.ones(2)}, spec, model) for i in range(2))
    )
    assert_same(results)
    assert results[0].round == 2
