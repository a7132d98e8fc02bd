"""The hot engine's promises: a SIGKILLed owner loses no acknowledged push and applies none twice,
takeover from snapshot + log is bit-identical to an uninterrupted run (and to the write-through
engine), replaying one log twice gives the same bytes, and a fenced-off owner cannot write.

The behaviour both engines share (idempotency, staleness, sync rounds, long-poll, many workers)
is tested by running those tests against both engines (the `engine` fixture in conftest.py).
"""

from __future__ import annotations

import time
from typing import Any

import httpx
import numpy as np
import pytest
import redis
import redis.asyncio as aioredis

from optserve.engine.errors import EngineError
from optserve.engine.hot.service import HotSessionService
from optserve.engine.pushes import PushRequest
from optserve.optim import get_algorithm
from optserve.optim.update import apply_update, initial_states
from optserve.store import keys
from optserve.store.hot_log import FencedOff, HotLog
from optserve.store.redis_store import RedisStore

from .api_helpers import ST, create, push, st_body, state
from .conftest import HOT_ENV, ServerProcess
from .test_concurrency import P0, PUSHES, SHAPES, WORKERS, grads_of, run_workers

SHAPE = (3, 4)
W0 = np.linspace(-1, 1, 12, dtype=np.float32).reshape(SHAPE)


def hot_env(valkey_url: str, **extra: str) -> dict[str, str]:
    return {"OPTSERVE_REDIS_URL": valkey_url, **HOT_ENV, **extra}


def owner_url(valkey_url: str, sid: str) -> str | None:
    client = redis.Redis.from_url(valkey_url)
    try:
        holder = client.get(keys.owner_key(sid))
    finally:
        client.close()
    return holder.decode().split(" ", 2)[2] if holder else None


def kill_owner(servers: list[ServerProcess], valkey_url: str, sid: str) -> ServerProcess:
    url = owner_url(valkey_url, sid)
    (owner,) = [server for server in servers if server.url == url]
    owner.kill()
    return owner


# -- the owner dies mid-traffic ------------------------------------------------------------------


def test_owner_sigkilled_mid_traffic_loses_nothing_and_doubles_nothing(
    server_factory, valkey_server, tmp_path
):
    """8 worker processes push through two replicas; when a third of the pushes are in, the
    owner is SIGKILLed. The workers retry what was not acknowledged (same Idempotency-Key, the
    other replica), which takes the session over from snapshot + log. Every push is applied
    exactly once and every acknowledged response holds exactly the SGD sum of the pushes up to
    the version of its params."""
    env = hot_env(valkey_server.url, OPTSERVE_HOT_SNAPSHOT_STEPS="16")
    servers = [server_factory(**env) for _ in range(2)]
    urls = [server.url for server in servers]
    lr = 0.5
    with httpx.Client(base_url=urls[0], timeout=30) as client:
        sid = create(client, {"name": "sgd", "lr": lr}, P0)["id"]
    killed: list[ServerProcess] = []
    store = redis.Redis.from_url(valkey_server.url)

    def kill_when_a_third_is_in() -> None:
        deadline = time.monotonic() + 60
        while int(store.hget(keys.meta_key(sid), "version") or 0) < WORKERS * PUSHES // 3:
            assert time.monotonic() < deadline, "the pushes did not get going"
            time.sleep(0.005)
        killed.append(kill_owner(servers, valkey_server.url, sid))

    try:
        records = run_workers(
            urls, sid, tmp_path, extra=["--retry-s", "30"], during=kill_when_a_third_is_in
        )
        fence = int(store.get(keys.fence_key(sid)))
        # snapshots trimmed the log behind them, gradients and all (16 entries per snapshot)
        entries = store.xrange(keys.log_key(sid))
        stored = set(store.scan_iter(match=f"optserve:{{{sid}}}:lg:*"))
    finally:
        store.close()
    assert len(entries) < 64
    logged = set()
    for _, fields in entries:
        version, names = int(fields[b"version"]), fields[b"tensors"].decode()
        for name in names.split(","):
            logged.add(keys.log_array_key(sid, version, name.rpartition(":")[0]).encode())
    assert stored == logged
    (survivor,) = [server for server in servers if server not in killed]
    assert fence >= 2, "the survivor took the session over with a new fencing token"
    assert owner_url(valkey_server.url, sid) == survivor.url
    assert any(r.get("retries") for r in records), "some pushes met the dead owner"

    failed = [r for r in records if r["status"] != 200]
    assert not failed, f"{len(failed)} pushes never acknowledged, e.g. {failed[:2]}"
    versions = sorted(r["version"] for r in records)
    assert versions == list(range(1, WORKERS * PUSHES + 1)), "each push applied exactly once"
    ordered = sorted(records, key=lambda r: r["version"])
    prefix = [{n: P0[n].astype(np.float64) for n in SHAPES}]
    for record in ordered:  # p0 - lr * sum(g): exact for these numbers in any order
        nxt = {n: a.copy() for n, a in prefix[-1].items()}
        for name, grad in grads_of(record).items():
            nxt[name] -= lr * grad
        prefix.append(nxt)
    for record in records:
        expected = prefix[record["params_version"]]
        if not record["replayed"]:
            assert record["params_version"] == record["version"]
        for name in SHAPES:
            got = np.asarray(record["params"][name], np.float32).reshape(SHAPES[name])
            np.testing.assert_array_equal(got, expected[name].astype(np.float32))
    with httpx.Client(base_url=survivor.url, timeout=30) as client:
        final = client.get(f"/v1/sessions/{sid}/params")
        assert final.json()["version"] == WORKERS * PUSHES
        for name in SHAPES:
            data = np.asarray(final.json()["params"][name]["data"], np.float32)
            np.testing.assert_array_equal(data.reshape(SHAPES[name]), prefix[-1][name])


# -- bit-identical takeover ------------------------------------------------------------------------


def adam_steps(client: httpx.Client, sid: str, steps: range) -> None:
    """A fixed sequence that uses every logged scalar: an lr schedule, clipping, stale pushes
    scaled by staleness, a skipped non-finite push and a PATCH of lr and betas."""
    for step in steps:
        if step == 5:
            changes = {"optimizer": {"lr": 0.02, "betas": [0.8, 0.99]}}
            assert client.patch(f"/v1/sessions/{sid}", json=changes).status_code == 200
        grad = np.random.default_rng(step).standard_normal(SHAPE).astype(np.float32) * 3
        version = client.get(f"/v1/sessions/{sid}").json()["version"]
        fields: dict[str, Any] = {"base_version": max(0, version - step % 3)}
        push(client, sid, {"w": grad}, **fields)
        if step == 7:
            body = st_body({"w": np.full(SHAPE, np.nan, np.float32)})
            response = client.post(
                f"/v1/sessions/{sid}/gradients", content=body, headers={"content-type": ST}
            )
            assert response.status_code == 200, response.text
            assert response.json()["applied"] is False


ADAM_SESSION = {
    "optimizer": {"name": "adam", "lr": 0.01, "weight_decay": 0.01},
    "fields": {
        "lr_schedule": {"type": "step", "step_size": 3, "gamma": 0.5},
        "clip_grad_norm": 2.0,
        "max_staleness": 1,
        "staleness": "scale",
        "nonfinite": "skip",
    },
}


def new_adam(client: httpx.Client) -> str:
    return create(client, ADAM_SESSION["optimizer"], {"w": W0}, **ADAM_SESSION["fields"])["id"]


def test_adam_after_takeover_is_bit_identical_to_an_uninterrupted_run(
    server_factory, valkey_server, api_server
):
    """12 steps on one replica (snapshots every 4 log entries, so the takeover reads a snapshot
    and a log tail), SIGKILL, 8 more through the other replica; the state (params, both moments,
    step, schedule, version) equals, byte for byte, the same 20 steps run without interruption
    on the hot engine and on the write-through engine."""
    env = hot_env(valkey_server.url, OPTSERVE_HOT_SNAPSHOT_STEPS="4", OPTSERVE_HOT_SNAPSHOT_S="60")
    first, second = server_factory(**env), server_factory(**env)
    with httpx.Client(base_url=first.url, timeout=30) as a:
        sid = new_adam(a)
        adam_steps(a, sid, range(12))
    assert owner_url(valkey_server.url, sid) == first.url
    first.kill()
    with httpx.Client(base_url=second.url, timeout=30) as b:
        adam_steps(b, sid, range(12, 20))
        taken_over = state(b, sid)
        reference = new_adam(b)
        adam_steps(b, reference, range(20))
        uninterrupted = state(b, reference)
    with httpx.Client(base_url=api_server.url, timeout=30) as c:
        write_through = new_adam(c)
        adam_steps(c, write_through, range(20))
        written_through = state(c, write_through)
    assert taken_over[1]["version"] == 20
    assert set(taken_over[0]) == {"w/param", "w/exp_avg", "w/exp_avg_sq"}
    assert taken_over == uninterrupted
    assert taken_over == written_through


# -- replay, in process ----------------------------------------------------------------------------


@pytest.fixture
def anyio_backend():
    return "asyncio"


def reference_adam(grads: list[np.ndarray]) -> tuple[np.ndarray, dict]:
    algorithm = get_algorithm("adam")
    hp = algorithm.configure({"lr": 0.01})
    params = {"w": W0.copy()}
    states = initial_states(algorithm, hp, params)
    for grad in grads:
        apply_update(algorithm, hp, params, {"w": grad.copy()}, states, hp["lr"])
    return params["w"], states["w"]


def hot_service(url: str, owner: str) -> HotSessionService:
    store = RedisStore.from_url(url)
    log = HotLog(store.client, chunk_bytes=store.chunk_bytes)
    return HotSessionService(store, log=log, owner_id=owner, url=f"http://{owner}", lease_ms=1000)


@pytest.mark.anyio
async def test_replaying_the_same_log_twice_gives_the_same_bytes(server_factory, redis_url):
    """A server logs 12 Adam pushes (no snapshot but the first) and is SIGKILLed; two processes
    in turn load the session from snapshot + log: both reach the exact bytes of the optimizer
    core run directly."""
    server = server_factory(**hot_env(redis_url, OPTSERVE_HOT_SNAPSHOT_STEPS="1000"))
    grads = [np.random.default_rng(k).standard_normal(SHAPE).astype(np.float32) for k in range(12)]
    with httpx.Client(base_url=server.url, timeout=30) as client:
        sid = create(client, {"name": "adam", "lr": 0.01}, {"w": W0})["id"]
        for grad in grads:
            push(client, sid, {"w": grad})
    server.kill()
    raw = aioredis.Redis.from_url(redis_url)
    assert await raw.xlen(keys.log_key(sid)) == 12  # all of it in the log
    await raw.delete(keys.owner_key(sid))  # as if its lease had lapsed: no need to wait
    await raw.aclose()

    expected_w, expected_state = reference_adam(grads)
    loaded = []
    for owner in ("replica-a", "replica-b"):
        service = hot_service(redis_url, owner)
        try:
            hs = await service._own(sid)
            assert hs.version == 12 and len(hs.logged) == 12
            arrays = {k: np.asarray(v).tobytes() for k, v in hs.states["w"].items()}
            loaded.append((hs.params["w"].tobytes(), arrays))
        finally:
            await service.close()  # gives the lease back: the next one loads at once
            await service.store.close()
    assert loaded[0] == loaded[1]
    assert loaded[0][0] == expected_w.tobytes()
    assert loaded[0][1] == {k: np.asarray(v).tobytes() for k, v in expected_state.items()}


@pytest.mark.anyio
async def test_a_fenced_off_owner_cannot_write_and_lets_go(redis_url, valkey_server):
    """The owner's lease lapses (deleted here, as if it had paused past its TTL) and another
    process takes the session over: the old owner's next push is refused by the fencing check,
    nothing of it reaches the log or the session, and the old owner drops its copy."""
    first, second = hot_service(redis_url, "first"), hot_service(redis_url, "second")
    try:
        sid = (await first.create({"optimizer": {"name": "sgd", "lr": 1.0}}, {"w": W0}))["id"]
        grad = {"w": np.ones(SHAPE, np.float32)}
        await first.push(sid, PushRequest(grads=grad))
        old = await first._own(sid)
        await first.store.client.delete(keys.owner_key(sid))
        taken = await second._own(sid)
        assert taken.holder.token > old.holder.token and taken.version == 1
        with pytest.raises(FencedOff):
            await first.log.append(sid, old.holder, [], {"updated_at": "x"}, at=1, version=None)
        with pytest.raises(EngineError) as refused:
            await first.push(sid, PushRequest(grads=grad))
        assert refused.value.code == "owner_unavailable" and old.lost
        assert await first.store.version(sid) == 1
        assert await first.store.client.xlen(keys.log_key(sid)) == 1
        result = await second.push(sid, PushRequest(grads=grad))
        assert result.version == 2
        np.testing.assert_array_equal(result.params["w"], W0 - 2)
    finally:
        for service in (first, second):
            await service.close()
            await service.store.close()
