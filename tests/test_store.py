"""The Redis store against a real valkey-server: snapshots, compare-and-set commits, deletion."""

from __future__ import annotations

import asyncio
import socket

import numpy as np
import pytest
import redis

from optserve.store import keys
from optserve.store.errors import SessionGone, StoreUnavailable, VersionConflict
from optserve.store.redis_store import RedisStore

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.fixture
async def store(redis_url):
    store = RedisStore.from_url(redis_url)
    yield store
    await store.close()


def f32(*values: float) -> bytes:
    return np.asarray(values, dtype="<f4").tobytes()


def session_keys(redis_url: str, sid: str) -> list[bytes]:
    client = redis.Redis.from_url(redis_url)
    try:
        return sorted(client.scan_iter(match=f"{keys.session_tag(sid)}:*"))
    finally:
        client.close()


async def test_create_then_read_everything(store):
    await store.create(
        "s1",
        {"config": "{}"},
        {"w": {"param": f32(1, 2, 3)}, "b": {"param": f32(4), "step": f32(0)}},
    )
    snap = await store.read("s1", state_of=["b"])
    assert snap.version == 0
    assert snap.meta["config"] == "{}"
    assert snap.manifests == {"w": {"param": 1}, "b": {"param": 1, "step": 1}}
    assert snap.arrays == {
        ("w", "param"): [f32(1, 2, 3)],
        ("b", "param"): [f32(4)],
        ("b", "step"): [f32(0)],
    }
    only_w = await store.read("s1", params=["w"])
    assert set(only_w.arrays) == {("w", "param")}
    assert await store.list_ids() == ["s1"]


async def test_commit_is_compare_and_set(store, redis_url):
    await store.create("s1", {}, {"w": {"param": f32(0)}})
    base = await store.read("s1")
    version = await store.commit(base, {"w": {"param": f32(1), "exp_avg": f32(9)}}, {"x": "1"})
    assert version == 1
    with pytest.raises(VersionConflict) as caught:
        await store.commit(base, {"w": {"param": f32(2)}})  # stale: based on version 0
    assert caught.value.current == 1
    snap = await store.read("s1", state_of=["w"])
    assert snap.version == 1 and snap.meta["x"] == "1"
    assert snap.arrays[("w", "param")] == [f32(1)]
    assert snap.manifests["w"] == {"exp_avg": 1, "param": 1}
    assert not any(b":stage:" in key for key in session_keys(redis_url, "s1"))


async def test_replace_state_deletes_arrays_not_written(store, redis_url):
    await store.create("s1", {}, {"w": {"param": f32(0), "exp_avg": f32(1), "step": f32(1)}})
    base = await store.read("s1")
    await store.commit(base, {"w": {"param": f32(5)}}, replace_state=["w"])
    snap = await store.read("s1", state_of=["w"])
    assert snap.manifests["w"] == {"param": 1}
    assert session_keys(redis_url, "s1") == sorted(
        [keys.meta_key("s1").encode(), keys.array_key("s1", "w", "param").encode()]
    )


async def test_commit_without_bump_keeps_version(store):
    await store.create("s1", {}, {"w": {"param": f32(0)}})
    base = await store.read_meta("s1")
    assert await store.commit(base, {}, {"config": "new"}, bump_version=False) == 0
    assert (await store.read_meta("s1")).meta["config"] == "new"


async def test_delete_removes_every_key(store, redis_url):
    await store.create("s1", {}, {"w": {"param": f32(0), "exp_avg": f32(0)}})
    await store.create("s2", {}, {"w": {"param": f32(0)}})
    base = await store.read("s1")
    assert await store.delete("s1") is True
    assert session_keys(redis_url, "s1") == []
    assert await store.list_ids() == ["s2"]
    assert await store.delete("s1") is False
    with pytest.raises(SessionGone):
        await store.read("s1")
    with pytest.raises(SessionGone):
        await store.commit(base, {"w": {"param": f32(1)}})
    assert session_keys(redis_url, "s1") == []  # the refused commit's staged arrays are gone too


async def test_fsync_always_commits_with_waitaof(redis_url):
    store = RedisStore.from_url(redis_url, fsync_always=True)
    try:
        await store.create("s1", {}, {"w": {"param": f32(0)}})
        assert await store.commit(await store.read("s1"), {"w": {"param": f32(1)}}) == 1
    finally:
        await store.close()


async def test_concurrent_read_modify_write_loses_nothing(redis_url):
    """Eight clients increment one array through snapshot + compare-and-set with retry."""
    setup = RedisStore.from_url(redis_url)
    await setup.create("s1", {}, {"w": {"param": f32(0, 0)}})
    await setup.close()

    async def worker(increments: int) -> int:
        store = RedisStore.from_url(redis_url)
        conflicts = 0
        try:
            for _ in range(increments):
                while True:
                    snap = await store.read("s1")
                    value = np.frombuffer(snap.arrays[("w", "param")][0], "<f4") + 1
                    try:
                        await store.commit(snap, {"w": {"param": value.tobytes()}})
                        break
                    except VersionConflict:
                        conflicts += 1
        finally:
            await store.close()
        return conflicts

    await asyncio.gather(*(worker(25) for _ in range(8)))
    check = RedisStore.from_url(redis_url)
    snap = await check.read("s1")
    await check.close()
    assert snap.version == 200
    np.testing.assert_array_equal(np.frombuffer(snap.arrays[("w", "param")][0], "<f4"), [200, 200])


async def test_unreachable_store_raises_store_unavailable():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again below: nothing listens there
    store = RedisStore.from_url(f"redis://127.0.0.1:{port}", socket_connect_timeout=1)
    try:
        with pytest.raises(StoreUnavailable):
            await store.ping()
        with pytest.raises(StoreUnavailable):
            await store.read("s1")
    finally:
        await store.close()


@pytest.mark.parametrize("elements", [0, 1, 15, 16, 17, 32, 33, 100])
async def test_arrays_are_chunked_at_any_size(redis_url, elements):
    """Chunks of 64 bytes (16 float32): sizes below, at and across chunk edges round-trip, every
    stored value stays within the chunk size, and deleting removes every chunk."""
    store = RedisStore.from_url(redis_url, chunk_bytes=64)
    try:
        data = np.arange(elements, dtype="<f4")
        await store.create("c", {}, {"w": {"param": memoryview(data).cast("B")}})
        expected_chunks = max(1, -(-elements // 16))
        snap = await store.read("c")
        assert snap.manifests["w"] == {"param": expected_chunks}
        assert b"".join(snap.arrays[("w", "param")]) == data.tobytes()
        client = redis.Redis.from_url(redis_url)
        sizes = [client.strlen(key) for key in session_keys(redis_url, "c") if b":a:" in key]
        client.close()
        assert len(sizes) == expected_chunks and max(sizes) <= 64
        doubled = (data * 2).astype("<f4")
        await store.commit(snap, {"w": {"param": doubled.tobytes(), "exp_avg": data.tobytes()}})
        again = await store.read("c", state_of=["w"])
        assert b"".join(again.arrays[("w", "param")]) == doubled.tobytes()
        assert b"".join(again.arrays[("w", "exp_avg")]) == data.tobytes()
        await store.commit(again, {"w": {"param": data.tobytes()}}, replace_state=["w"])
        assert await store.delete("c")
        assert session_keys(redis_url, "c") == []
    finally:
        await store.close()
