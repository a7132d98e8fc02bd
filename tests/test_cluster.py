"""optserve on a Redis Cluster: three Valkey masters started from the shipped binary (slots
assigned here, tests/valkey_cluster.py), two `optserve serve` processes given one node's URL;
every test that runs them runs on both engines.

Every key of a session shares its hash tag, so a session lives on exactly one node and its
scripts, transactions and pipelines run there; sessions spread over all nodes. The same exact
SGD invariant as tests/test_concurrency.py holds on sessions of every node, and sync rounds and
long-poll (scripts plus pub/sub, which a cluster broadcasts) work across the two servers.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import redis

from optserve.store.cluster import detect_cluster
from optserve.store.errors import StoreUnavailable
from optserve.store.redis_store import RedisStore

from .api_helpers import assert_problem, create, from_json, push, state, tensor
from .conftest import ENGINES, HOT_ENV, ServerProcess, free_port
from .test_concurrency import P0, SHAPES, acknowledged_in_order, grads_of, run_workers
from .valkey_cluster import ValkeyCluster

SESSIONS = 50


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ValkeyCluster]:
    nodes = ValkeyCluster(tmp_path_factory.mktemp("cluster")).start()
    try:
        yield nodes
    finally:
        nodes.stop()


@pytest.fixture(scope="module", params=ENGINES)
def servers(cluster, tmp_path_factory, request) -> Iterator[list[ServerProcess]]:
    """Two optserve processes told only the URL of node 0: they detect the cluster. Every test
    that uses them runs on both engines (with the hot engine, each session is owned by one of
    the two, which the other forwards to)."""
    logs = tmp_path_factory.mktemp("cluster-api")
    env = {"OPTSERVE_REDIS_URL": cluster.url, "OPTSERVE_REDIS_CLUSTER": None}
    if request.param == "hot":
        env |= HOT_ENV
    started = [ServerProcess(env, logs / f"optserve-{index}.log") for index in range(2)]
    try:
        with ThreadPoolExecutor(2) as pool:  # both start at once
            list(pool.map(ServerProcess.start, started))
        yield started
    finally:
        for server in started:
            server.stop()


@pytest.fixture
def urls(servers) -> list[str]:
    return [server.url for server in servers]


def node_of(cluster: ValkeyCluster, sid: str) -> int:
    """The node whose slots hold the session's hash tag, as the cluster itself computes it."""
    with cluster.client(0) as client:
        slot = client.execute_command("CLUSTER", "KEYSLOT", f"optserve:{{{sid}}}:meta")
    return cluster.node_of_slot(int(slot))


def session_keys(cluster: ValkeyCluster, sid: str) -> list[list[bytes]]:
    """Per node, every key of the session stored there."""
    found = []
    for index in range(cluster.count):
        with cluster.client(index) as client:
            found.append(sorted(client.scan_iter(match=f"optserve:{{{sid}}}:*", count=1000)))
    return found


def sessions_on_every_node(cluster, client: httpx.Client, per_node: int = 1, **fields) -> list:
    """Create sessions until each node holds `per_node`; returns [(sid, node)], node-ordered."""
    chosen: dict[int, list[str]] = {index: [] for index in range(cluster.count)}
    while any(len(sids) < per_node for sids in chosen.values()):
        sid = create(client, {"name": "sgd", "lr": 0.5}, P0, **fields)["id"]
        node = node_of(cluster, sid)
        if len(chosen[node]) < per_node:
            chosen[node].append(sid)
    return [(sid, node) for node, sids in chosen.items() for sid in sids]


# -- choosing the client ---------------------------------------------------------------------


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.mark.anyio
async def test_the_url_of_one_node_is_detected_as_a_cluster(cluster, redis_url):
    assert await detect_cluster(cluster.urls[2]) is True
    assert await detect_cluster(redis_url) is False
    store = await RedisStore.connect(cluster.url)
    single = await RedisStore.connect(redis_url)
    try:
        assert store.cluster and not single.cluster
        await store.ping()
    finally:
        await store.close()
        await single.close()


@pytest.mark.anyio
async def test_a_forced_setting_the_store_contradicts_stops_startup(cluster, redis_url, nowhere):
    """OPTSERVE_REDIS_CLUSTER=1 on one server (or 0 on a cluster node) would fail every request
    later; it fails at startup instead, saying what to set. Unreachable: the setting decides."""
    with pytest.raises(RuntimeError, match="OPTSERVE_REDIS_CLUSTER=0"):
        await RedisStore.connect(redis_url, cluster=True)
    with pytest.raises(RuntimeError, match="OPTSERVE_REDIS_CLUSTER=1"):
        await RedisStore.connect(cluster.urls[0], cluster=False)
    for url, forced in ((cluster.urls[1], True), (redis_url, False), (nowhere, True)):
        store = await RedisStore.connect(url, cluster=forced, socket_connect_timeout=1)
        assert store.cluster is forced
        await store.close()


def test_a_server_told_cluster_on_one_server_exits_with_advice(valkey_server, tmp_path):
    server = ServerProcess(
        {"OPTSERVE_REDIS_URL": valkey_server.url, "OPTSERVE_REDIS_CLUSTER": "1"},
        tmp_path / "optserve.log",
    )
    with pytest.raises(RuntimeError, match="exited early"):
        server.start(timeout=30)
    log = server.log_path.read_text()
    assert "OPTSERVE_REDIS_CLUSTER=0" in log and "Traceback" not in log


@pytest.fixture
def nowhere() -> str:
    """A URL nothing listens on."""
    return f"redis://127.0.0.1:{free_port()}"


@pytest.mark.anyio
async def test_an_unreachable_store_of_unknown_kind_stops_startup_with_advice(nowhere):
    with pytest.raises(RuntimeError, match="OPTSERVE_REDIS_CLUSTER"):
        await detect_cluster(nowhere, timeout_s=0.3)


@pytest.mark.anyio
async def test_an_unreachable_cluster_is_store_unavailable(nowhere):
    """As on one server: the API answers 503 store_unavailable, and the client retries."""
    store = RedisStore.from_url(nowhere, cluster=True, socket_connect_timeout=1)
    try:
        with pytest.raises(StoreUnavailable):
            await store.ping()
        with pytest.raises(StoreUnavailable):
            await store.read("s1")
    finally:
        await store.close()


# -- sessions spread over the nodes ----------------------------------------------------------


def test_fifty_sessions_spread_over_three_nodes_each_on_one(cluster, urls):
    with (
        httpx.Client(base_url=urls[0], timeout=60) as a,
        httpx.Client(base_url=urls[1], timeout=60) as b,
    ):
        sids = [
            create([a, b][k % 2], {"name": "adam", "lr": 0.01}, P0)["id"] for k in range(SESSIONS)
        ]
        nodes = {sid: node_of(cluster, sid) for sid in sids}
        assert set(nodes.values()) == {0, 1, 2}, "every node holds sessions"
        for sid in sids:
            found = session_keys(cluster, sid)
            holders = [index for index, keys in enumerate(found) if keys]
            assert holders == [nodes[sid]], f"session {sid} is on nodes {holders}"
            names = {key.decode().rsplit(":", 1)[-1] for key in found[nodes[sid]]}
            assert {"meta", "w", "b"} <= names  # meta and both tensors' arrays, all there

        listed = {s["id"] for s in a.get("/v1/sessions", params={"limit": 1000}).json()["sessions"]}
        assert set(sids) <= listed
        # a push through either server commits on the session's node (the commit script)
        grads = {name: np.full(shape, 0.5, np.float32) for name, shape in SHAPES.items()}
        for k, sid in enumerate(sids):
            assert push([a, b][k % 2], sid, grads)["version"] == 1
        states = [b.get(f"/v1/sessions/{sid}/state").json() for sid in sids[:6]]
        assert {s["version"] for s in states} == {1}
        assert all(s["tensors"]["w"]["step"] == 1.0 for s in states)
        # deletion removes every key from the node and the id from the index
        doomed = sids[:3]
        for sid in doomed:
            assert b.delete(f"/v1/sessions/{sid}").status_code == 204
            assert a.get(f"/v1/sessions/{sid}").status_code == 404
            assert session_keys(cluster, sid) == [[], [], []]
        listed = {s["id"] for s in a.get("/v1/sessions", params={"limit": 1000}).json()["sessions"]}
        assert not set(doomed) & listed and set(sids[3:]) <= listed


def test_an_index_entry_without_its_session_is_not_listed(cluster, urls):
    """What a crash between listing a new id and writing its session leaves behind."""
    with httpx.Client(base_url=urls[0], timeout=60) as client:
        sid = create(client, {"name": "sgd"}, P0)["id"]
        with redis.RedisCluster.from_url(cluster.url) as direct:
            direct.zadd("optserve:sessions", {"0" * 32: time.time()})
        response = client.get("/v1/sessions", params={"limit": 1000})
        assert response.status_code == 200
        listed = {s["id"] for s in response.json()["sessions"]}
        assert sid in listed and "0" * 32 not in listed
        assert client.get(f"/v1/sessions/{'0' * 32}").status_code == 404


def test_an_idempotency_key_replays_on_the_other_server(cluster, urls):
    with (
        httpx.Client(base_url=urls[0], timeout=60) as a,
        httpx.Client(base_url=urls[1], timeout=60) as b,
    ):
        for sid, _ in sessions_on_every_node(cluster, a):
            body = json.dumps({"grads": {"b": tensor(np.ones(8, np.float32))}})
            headers = {"content-type": "application/json", "idempotency-key": f"k-{sid}"}
            first = a.post(f"/v1/sessions/{sid}/gradients", content=body, headers=headers)
            again = b.post(f"/v1/sessions/{sid}/gradients", content=body, headers=headers)
            assert first.status_code == again.status_code == 200
            assert again.headers["idempotency-replayed"] == "true"
            assert again.json()["version"] == first.json()["version"] == 1
            assert b.get(f"/v1/sessions/{sid}").json()["version"] == 1


def test_scripts_are_loaded_again_after_a_node_lost_them(cluster, urls):
    """A restarted or new node has no scripts: a pipeline that ran one loads it and runs again
    (the commit, and a sync round's settle), and the step is applied exactly once."""
    mode = {"type": "sync", "workers": 1, "timeout_s": 20}
    with httpx.Client(base_url=urls[0], timeout=60) as client:
        plain = sessions_on_every_node(cluster, client)
        rounds = sessions_on_every_node(cluster, client, mode=mode)
        for index in range(cluster.count):
            with cluster.client(index) as node:
                node.script_flush()
        grads = {"b": np.ones(8, np.float32)}
        for sid, _ in plain + rounds:
            result = push(client, sid, grads, worker="w")
            assert result["version"] == 1
            np.testing.assert_array_equal(from_json(result["params"]["b"]), P0["b"] - 0.5)


# -- session lifetime: expiry, touch and the sweeper on a cluster ----------------------------


def test_a_session_with_a_ttl_is_renewed_by_use_and_expires_whole_on_its_node(cluster, urls):
    """Reads renew the TTL with a script inside the read's MULTI; with the nodes' scripts
    flushed first, that MULTI meets NOSCRIPT, loads the script and runs again."""
    with httpx.Client(base_url=urls[0], timeout=60) as client:
        chosen = sessions_on_every_node(cluster, client, ttl_s=1.5)
        for index in range(cluster.count):
            with cluster.client(index) as node:
                node.script_flush()
        for sid, node in chosen:
            assert client.get(f"/v1/sessions/{sid}/params").status_code == 200
            with cluster.client(node) as direct:
                assert 0 < direct.pttl(f"optserve:{{{sid}}}:meta") <= 1500
        time.sleep(1.0)
        for sid, _ in chosen:  # a read 1 s in: each lives 1.5 s more from here
            assert client.get(f"/v1/sessions/{sid}/params").status_code == 200
        time.sleep(1.0)
        for sid, _ in chosen:
            assert client.get(f"/v1/sessions/{sid}").status_code == 200
        time.sleep(1.7)
        for sid, _ in chosen:
            assert client.get(f"/v1/sessions/{sid}").status_code == 404
            assert session_keys(cluster, sid) == [[], [], []]


@pytest.mark.anyio
async def test_the_sweeper_clears_every_node_and_spares_ids_still_being_created(cluster):
    """Leftover keys of gone sessions are found on every node; a gone session's index entry is
    dropped once it is older than CREATE_GRACE_S, not before (a create lists its id first)."""
    from optserve.store.redis_store import CREATE_GRACE_S
    from optserve.store.sweeper import sweep

    store = await RedisStore.connect(cluster.url)
    direct = redis.RedisCluster.from_url(cluster.url)
    try:
        alive = [f"{n:032x}" for n in range(1, 4)]
        gone = [f"{n:032x}" for n in range(100, 130)]  # leftovers only: spread over the nodes
        for sid in alive:
            await store.create(sid, {"config": "{}"}, {"w": {"param": b"\0" * 8}})
        for sid in gone:
            direct.set(f"optserve:{{{sid}}}:idem:x", b"r")
        old = time.time() - CREATE_GRACE_S - 60
        direct.zadd("optserve:sessions", {sid: old for sid in gone[:10]})
        direct.zadd("optserve:sessions", {sid: time.time() for sid in gone[10:12]})
        assert {node_of(cluster, sid) for sid in gone} == {0, 1, 2}
        assert await sweep(store) == (10, len(gone))
        assert all(session_keys(cluster, sid) == [[], [], []] for sid in gone)
        listed = set(await store.list_ids(0, 1000))
        assert listed >= set(alive) | set(gone[10:12]) and not listed & set(gone[:10])
        assert all(any(session_keys(cluster, sid)) for sid in alive)
    finally:
        direct.close()
        await store.close()


# -- many workers: the exact SGD invariant on sessions of every node --------------------------


def test_sgd_many_workers_on_sessions_of_every_node(cluster, urls, tmp_path):
    """As tests/test_concurrency.py, on three sessions (one per node) at once: 4 worker
    processes per session, 25 pushes each, through both servers."""
    lr, workers, pushes = 0.5, 4, 25
    with httpx.Client(base_url=urls[0], timeout=60) as client:
        chosen = sessions_on_every_node(cluster, client)

        def run(sid: str) -> list[dict]:
            (tmp_path / sid).mkdir()
            return run_workers(urls, sid, tmp_path / sid, workers=workers, pushes=pushes)

        with ThreadPoolExecutor(len(chosen)) as pool:
            results = list(pool.map(run, [sid for sid, _ in chosen]))

        for (sid, node), records in zip(chosen, results, strict=True):
            ordered = acknowledged_in_order(client, sid, records, workers * pushes)
            final = {
                name: from_json(spec)
                for name, spec in client.get(f"/v1/sessions/{sid}/params").json()["params"].items()
            }
            # p0 - lr * sum(g): exact in float64 and float32 alike for these numbers
            expected = {name: P0[name].astype(np.float64) for name in SHAPES}
            for record in ordered:
                for name, grad in grads_of(record).items():
                    expected[name] -= lr * grad
                for name, array in expected.items():
                    got = np.asarray(record["params"][name], np.float32).reshape(SHAPES[name])
                    np.testing.assert_array_equal(
                        got, array, err_msg=f"node {node}, version {record['version']}, {name}"
                    )
            for name in SHAPES:
                np.testing.assert_array_equal(final[name], expected[name].astype(np.float32))


# -- sync rounds and long-poll: scripts and pub/sub across nodes and servers ------------------


def test_sync_rounds_on_sessions_of_every_node(cluster, urls):
    """Three pushers per round, spread over both servers: whichever server applies the round,
    the others are woken by its PUBLISH, which the cluster broadcasts to every node."""
    mode = {"type": "sync", "workers": 3, "timeout_s": 20}
    with httpx.Client(base_url=urls[0], timeout=60) as client:
        chosen = sessions_on_every_node(cluster, client, mode=mode)

    def post(job: tuple[str, int, int]) -> httpx.Response:
        sid, worker, round_ = job
        grad = np.full(8, worker + 1 + round_, np.float32)  # mean of 3 is exact
        body = {"grads": {"b": tensor(grad)}, "worker": f"w{worker}"}
        with httpx.Client(base_url=urls[worker % 2], timeout=60) as own:
            return own.post(f"/v1/sessions/{sid}/gradients", json=body)

    expected = {sid: P0["b"].copy() for sid, _ in chosen}
    with ThreadPoolExecutor(3 * len(chosen)) as pool:
        for round_ in range(2):
            jobs = [(sid, worker, round_) for sid, _ in chosen for worker in range(3)]
            started = time.monotonic()
            responses = list(pool.map(post, jobs))
            # the waiters heard the round's announcement, not their deadline
            assert time.monotonic() - started < 15
            for index, (sid, _) in enumerate(chosen):
                mine = responses[3 * index : 3 * index + 3]
                bodies = [r.json() for r in mine]
                assert all(r.status_code == 200 for r in mine), bodies
                assert {b["version"] for b in bodies} == {round_ + 1}
                expected[sid] = expected[sid] - np.float32(0.5) * np.float32(2 + round_)
                for body in bodies:
                    np.testing.assert_array_equal(from_json(body["params"]["b"]), expected[sid])


def test_long_poll_wakes_on_a_push_to_any_node(cluster, urls):
    with (
        httpx.Client(base_url=urls[0], timeout=60) as a,
        httpx.Client(base_url=urls[1], timeout=60) as b,
    ):
        chosen = sessions_on_every_node(cluster, a)
        for sid, node in chosen:

            def push_later(sid: str = sid) -> None:
                time.sleep(0.3)
                push(a, sid, {"b": np.ones(8, np.float32)})

            thread = threading.Thread(target=push_later)
            thread.start()
            started = time.monotonic()
            response = b.get(
                f"/v1/sessions/{sid}/params", params={"after_version": 0, "wait_s": 20}
            )
            elapsed = time.monotonic() - started
            thread.join()
            assert response.status_code == 200 and response.json()["version"] == 1
            assert elapsed < 15, f"node {node}: woke at the end of wait_s, not on the push"


# -- durability: WAITAOF goes to the node that owns the session ------------------------------


@pytest.mark.parametrize("engine", ENGINES)
def test_fsync_always_waits_on_the_node_of_each_session(cluster, server_factory, engine):
    """WAITAOF waits for the writes of its own connection, so it must go with the commit (the
    hot engine: the log append) to the session's node; counted there by the nodes' own command
    statistics."""
    server = server_factory(  # told it is a cluster (no question asked), given another node
        OPTSERVE_REDIS_URL=cluster.urls[1],
        OPTSERVE_REDIS_CLUSTER="1",
        OPTSERVE_FSYNC="always",
        **(HOT_ENV if engine == "hot" else {}),
    )
    clients = [cluster.client(index) for index in range(cluster.count)]
    try:
        for node in clients:  # the nodes fsync every write: WAITAOF returns at once
            node.config_set("appendfsync", "always")
        with httpx.Client(base_url=server.url, timeout=60) as client:
            chosen = sessions_on_every_node(cluster, client, per_node=2)
            for sid, _ in chosen:  # loads the scripts on every node: a NOSCRIPT re-run of the
                push(client, sid, {"b": np.ones(8, np.float32)})  # first commit is not counted
            for node in clients:
                node.config_resetstat()
            pushes = {0: 1, 1: 2, 2: 3}
            for sid, node in chosen:
                for _ in range(pushes[node]):
                    push(client, sid, {"b": np.ones(8, np.float32)})
        calls = [_waitaof_calls(node) for node in clients]
        assert calls == [2 * pushes[0], 2 * pushes[1], 2 * pushes[2]]
    finally:
        for node in clients:
            node.config_set("appendfsync", "everysec")
            node.close()


def _waitaof_calls(node: redis.Redis) -> int:
    stats = node.info("commandstats").get("cmdstat_waitaof")
    return int(stats["calls"]) if stats else 0


# -- the hot engine: a killed owner's sessions taken over from their nodes ------------------------


def test_a_killed_hot_owner_is_taken_over_from_every_node(cluster, server_factory):
    """Sessions on every node, 5 pushes each through one hot replica (a snapshot every 3 log
    entries), which is then SIGKILLed: the other replica, asked next, waits out the dead
    owner's lease and loads each session from its node (snapshot plus the 2 entries after it);
    the sixth push continues exactly."""
    env = {
        "OPTSERVE_REDIS_URL": cluster.url,
        "OPTSERVE_REDIS_CLUSTER": "1",
        **HOT_ENV,
        "OPTSERVE_HOT_SNAPSHOT_STEPS": "3",
        "OPTSERVE_HOT_SNAPSHOT_S": "60",
    }
    first, second = server_factory(**env), server_factory(**env)
    grads = {"b": np.ones(8, np.float32)}
    with httpx.Client(base_url=first.url, timeout=60) as a:
        chosen = sessions_on_every_node(cluster, a)
        for sid, _ in chosen:
            for _ in range(5):
                push(a, sid, grads)
    for sid, node in chosen:  # the snapshot at 3 is written off the hot path: wait for it
        with cluster.client(node) as direct:
            deadline = time.monotonic() + 10
            while direct.xlen(f"optserve:{{{sid}}}:log") != 2 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert direct.xlen(f"optserve:{{{sid}}}:log") == 2
    first.kill()
    with httpx.Client(base_url=second.url, timeout=60) as b:
        for sid, node in chosen:
            result = push(b, sid, grads)
            assert result["version"] == 6, f"node {node}"
            np.testing.assert_array_equal(from_json(result["params"]["b"]), P0["b"] - 3.0)


# -- a node down: its sessions answer 503, nothing changes, and it all comes back ------------
# (last in the module: it stops and restarts a node of the shared cluster)


def test_a_node_down_is_503_for_its_sessions_and_nothing_changes(cluster, urls):
    with httpx.Client(base_url=urls[0], timeout=60) as client:
        chosen = sessions_on_every_node(cluster, client)
        for sid, _ in chosen:
            push(client, sid, {"b": np.ones(8, np.float32)})
        before = {sid: state(client, sid) for sid, _ in chosen}
        victim, down = next((s, n) for s, n in chosen if n != 0)  # not the URL's node
        cluster.kill(down)
        try:
            response = client.post(
                f"/v1/sessions/{victim}/gradients", json={"grads": {"b": tensor(np.ones(8))}}
            )
            assert_problem(response, 503, "store_unavailable")
        finally:
            cluster.restart(down)  # same port and files: the AOF brings its sessions back
        # redis-py re-sends nothing (a lost reply may have applied), so a pooled connection to
        # the restarted node fails its first use: one more 503, which clients retry
        for _ in range(10):
            response = client.get(f"/v1/sessions/{victim}")
            if response.status_code != 503:
                break
        assert response.status_code == 200, response.text
        for sid, _ in chosen:
            assert state(client, sid) == before[sid]
            assert push(client, sid, {"b": np.ones(8, np.float32)})["version"] == 2
