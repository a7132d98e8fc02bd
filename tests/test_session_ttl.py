"""Session lifetime (`ttl_s`): use renews it, idleness deletes the session with every key it has.

Checked with a raw Redis client: after expiry no key in the session's hash tag remains, and the
listing no longer shows it. Engine-level tests use a tiny chunk size so a small tensor spans many
chunks (the server's is 16 MiB).
"""

from __future__ import annotations

import asyncio
import time

import httpx
import numpy as np
import pytest
import redis

from optserve.engine.errors import EngineError
from optserve.engine.lifetime import Lifetime
from optserve.engine.pushes import PushRequest
from optserve.engine.sessions import SessionService
from optserve.store import keys
from optserve.store.errors import VersionConflict
from optserve.store.redis_store import RedisStore
from optserve.store.sweeper import sweep
from optserve_client import Client

from .api_helpers import assert_problem, create, push, tensor


@pytest.fixture
def anyio_backend():
    return "asyncio"


def tagged_keys(raw: redis.Redis, sid: str) -> list[bytes]:
    return sorted(raw.scan_iter(match=f"{keys.session_tag(sid)}:*", count=1000))


all_tagged_keys = tagged_keys


def wait_until(condition, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_use_renews_and_idleness_removes_every_key(server_factory, engine, engine_env, redis_url):
    """Data expires in Redis itself; the idempotency record (own TTL) goes with the sweeper.
    Both engines: the hot engine's log, fencing counter and lease expire with the session."""
    server = server_factory(**engine_env, OPTSERVE_SWEEP_INTERVAL_S="0.5")
    raw = redis.Redis.from_url(redis_url)
    with httpx.Client(base_url=server.url, timeout=30) as client:
        w0 = np.arange(6, dtype=np.float32).reshape(2, 3)
        session = create(client, {"name": "adam", "lr": 0.01}, {"w": w0, "b": np.ones(3)}, ttl_s=1)
        sid = session["id"]
        assert session["ttl_s"] == 1.0
        grads = {"w": np.ones((2, 3), np.float32), "b": np.ones(3, np.float32)}
        body = {"grads": {k: tensor(v) for k, v in grads.items()}}
        first = client.post(
            f"/v1/sessions/{sid}/gradients", json=body, headers={"Idempotency-Key": "k1"}
        )
        assert first.status_code == 200, first.text
        # Use keeps it alive well past its TTL: pushes, pulls and reads every 0.3 s for 2.4 s.
        deadline = time.monotonic() + 2.4
        calls = 0
        while time.monotonic() < deadline:
            kind = calls % 3
            if kind == 0:
                push(client, sid, {"w": np.ones((2, 3), np.float32)})  # "b" untouched: renewed too
            elif kind == 1:
                assert client.get(f"/v1/sessions/{sid}/params").status_code == 200
            else:
                assert client.get(f"/v1/sessions/{sid}").status_code == 200
            calls += 1
            time.sleep(0.3)
        assert client.get(f"/v1/sessions/{sid}").json()["version"] == 1 + (calls + 2) // 3
        live = tagged_keys(raw, sid)
        # "b"'s state: stored (write-through), or its one gradient in the log until a snapshot
        b_state = b":a:exp_avg:0:b" if engine == "write-through" else b":lg:1:0:b"
        assert any(b":idem:" in k for k in live) and any(b_state in k for k in live)
        ttls = {k: raw.pttl(k) for k in live if b":idem:" not in k}
        assert all(0 < t <= 1000 for t in ttls.values()), ttls
        assert sid in [s["id"] for s in client.get("/v1/sessions").json()["sessions"]]

        time.sleep(1.1)  # idle past the TTL: the data is gone at once, the rest within a sweep
        assert [k for k in tagged_keys(raw, sid) if b":idem:" not in k] == []
        assert wait_until(lambda: tagged_keys(raw, sid) == [])
        assert raw.zscore(keys.SESSION_INDEX, sid) is None  # the sweeper dropped it
        path = f"/v1/sessions/{sid}"
        assert_problem(client.get(path), 404, "session_not_found")
        assert_problem(client.get(f"{path}/params"), 404, "session_not_found")
        assert_problem(client.get(f"{path}/state"), 404, "session_not_found")
        long_poll = client.get(f"{path}/params", params={"after_version": 0, "wait_s": 0.1})
        assert_problem(long_poll, 404, "session_not_found")
        put_params = client.put(f"{path}/params", json={"params": {"w": tensor(w0)}})
        assert_problem(put_params, 404, "session_not_found")
        assert_problem(client.put(f"{path}/state", json={"tensors": {}}), 404, "session_not_found")
        assert_problem(client.post(f"{path}/gradients", json=body), 404, "session_not_found")
        assert_problem(client.patch(path, json={"ttl_s": 5}), 404, "session_not_found")
        assert_problem(client.delete(path), 404, "session_not_found")
        assert sid not in [s["id"] for s in client.get("/v1/sessions").json()["sessions"]]
        assert tagged_keys(raw, sid) == []  # nothing above wrote a key back
    raw.close()


def test_ttl_is_validated_and_changed_by_patch(engine_api_url, redis_url):
    """Both engines (the hot engine's ownership lease has its own TTL: not counted here)."""
    raw = redis.Redis.from_url(redis_url)

    def tagged_keys(raw: redis.Redis, sid: str) -> list[bytes]:
        return [k for k in all_tagged_keys(raw, sid) if not k.endswith(b":owner")]

    with httpx.Client(base_url=engine_api_url, timeout=30) as client:
        for bad in ("soon", 0.01, -1, True):
            response = client.post(
                "/v1/sessions", json={"optimizer": {"name": "sgd", "lr": 0.1},
                                      "params": {"w": tensor(np.ones(2))}, "ttl_s": bad},
            )  # fmt: skip
            assert_problem(response, 422, "invalid_session")
        sid = create(client, {"name": "sgd", "lr": 0.1}, {"w": np.ones(2)})["id"]
        assert client.get(f"/v1/sessions/{sid}").json()["ttl_s"] is None
        assert all(raw.pttl(k) == -1 for k in tagged_keys(raw, sid))
        patched = client.patch(f"/v1/sessions/{sid}", json={"ttl_s": 60})
        assert patched.status_code == 200 and patched.json()["ttl_s"] == 60
        assert all(55_000 < raw.pttl(k) <= 60_000 for k in tagged_keys(raw, sid))
        assert_problem(
            client.patch(f"/v1/sessions/{sid}", json={"ttl_s": 0}), 422, "invalid_session"
        )
        assert client.patch(f"/v1/sessions/{sid}", json={"ttl_s": None}).json()["ttl_s"] is None
        assert all(raw.pttl(k) == -1 for k in tagged_keys(raw, sid))
    raw.close()


@pytest.mark.anyio
async def test_chunked_session_expires_whole_and_a_racing_commit_cannot_split_it(redis_url):
    raw = redis.Redis.from_url(redis_url)
    store = RedisStore.from_url(redis_url, chunk_bytes=64)  # 16 float32 per chunk
    service = SessionService(store, lifetime=Lifetime())
    try:
        w = np.linspace(-1, 1, 100, dtype=np.float32)  # 7 chunks per array
        view = await service.create({"optimizer": {"name": "adam"}, "ttl_s": 0.6}, {"w": w})
        sid = view["id"]
        for step in range(3):
            await service.push(
                sid,
                PushRequest(
                    grads={"w": w * step}, idempotency_key=f"k{step}", body_digest=str(step)
                ),
            )
        live = tagged_keys(raw, sid)
        assert sum(b":a:" in k for k in live) == 3 * 7 + 1  # param, exp_avg(_sq) and step
        assert sum(b":idem:" in k for k in live) == 3
        assert all(0 < raw.pttl(k) <= 600 for k in live if b":idem:" not in k)

        # A commit prepared before the TTL changed is refused: its key list may be stale.
        stale = await store.read_meta(sid)
        await service.patch(sid, {"ttl_s": 30})
        with pytest.raises(VersionConflict):
            await store.commit(stale, {"w": {"param": w.tobytes()}})
        assert all(
            25_000 < raw.pttl(k) <= 30_000 for k in tagged_keys(raw, sid) if b":idem:" not in k
        )

        await service.patch(sid, {"ttl_s": 0.4})
        await asyncio.sleep(0.25)
        await service.get_params(sid)  # reads params only, but renews every key of the session
        data = [k for k in tagged_keys(raw, sid) if b":idem:" not in k]
        assert len(data) == 1 + 22 and all(200 < raw.pttl(k) <= 400 for k in data)
        await asyncio.sleep(0.7)
        assert [k for k in tagged_keys(raw, sid) if b":idem:" not in k] == []
        assert await sweep(store) == (1, 3)  # the three idempotency records
        assert tagged_keys(raw, sid) == []
        with pytest.raises(EngineError) as gone:
            await service.get(sid)
        assert gone.value.code == "session_not_found"
    finally:
        await service.close()
        await store.close()
        raw.close()


@pytest.mark.anyio
async def test_server_ttl_policy_default_and_maximum(redis_url):
    store = RedisStore.from_url(redis_url)
    capped = SessionService(store, lifetime=Lifetime(default_s=30, max_s=60))
    try:
        fields = {"optimizer": {"name": "sgd", "lr": 0.1}}
        params = {"w": np.ones(2, np.float32)}
        assert (await capped.create(fields, params))["ttl_s"] == 30
        assert (await capped.create({**fields, "ttl_s": 60}, params))["ttl_s"] == 60
        for refused in (61, None):
            with pytest.raises(EngineError) as error:
                await capped.create({**fields, "ttl_s": refused}, params)
            assert error.value.code == "invalid_session"
    finally:
        await capped.close()
        await store.close()


@pytest.mark.anyio
async def test_sweeper_clears_index_entries_and_leftover_keys(redis_url):
    raw = redis.Redis.from_url(redis_url)
    store = RedisStore.from_url(redis_url)
    service = SessionService(store)
    try:
        fields = {"optimizer": {"name": "sgd", "lr": 0.1}}
        params = {"w": np.ones(2, np.float32)}
        kept = (await service.create(fields, params))["id"]
        await service.push(kept, PushRequest(grads=params, idempotency_key="a", body_digest="a"))
        deleted = (await service.create(fields, params))["id"]
        await service.push(deleted, PushRequest(grads=params, idempotency_key="a", body_digest="a"))
        await service.delete(deleted)  # its idempotency record has its own (24 h) TTL
        expired = (await service.create({**fields, "ttl_s": 0.2}, params))["id"]
        sync_mode = {"type": "sync", "workers": 1, "timeout_s": 5}
        synced = (await service.create({**fields, "mode": sync_mode, "ttl_s": 0.2}, params))["id"]
        await service.push(synced, PushRequest(grads=params, worker="w1"))
        raw.set("optserve:{tenant-1}:other", "not a session's")  # another hash tag: untouched
        await asyncio.sleep(0.4)
        assert tagged_keys(raw, deleted) != []
        leftover = tagged_keys(raw, synced)  # its data expired; its round keys have own TTLs
        assert leftover and not any(b":meta" in k or b":a:" in k for k in leftover), leftover
        assert raw.zscore(keys.SESSION_INDEX, expired) is not None
        assert await sweep(store) == (2, 1 + len(leftover))
        assert tagged_keys(raw, deleted) == tagged_keys(raw, expired) == []
        assert tagged_keys(raw, synced) == []
        assert raw.zscore(keys.SESSION_INDEX, expired) is None
        assert len(tagged_keys(raw, kept)) == 3  # meta, param, idempotency record
        assert raw.get("optserve:{tenant-1}:other") == b"not a session's"
        assert [v["id"] for v in await service.list()] == [kept]
    finally:
        await service.close()
        await store.close()
        raw.close()


def test_python_client_sets_and_clears_ttl(api_url):
    with Client(api_url) as client:
        session = client.create_session("sgd", {"w": np.ones(2, np.float32)}, lr=0.1, ttl_s=30)
        assert session.info()["ttl_s"] == 30
        assert session.update(ttl_s=5)["ttl_s"] == 5
        assert session.update(lr=0.2)["ttl_s"] == 5  # left out: unchanged
        assert session.update(ttl_s=None)["ttl_s"] is None
