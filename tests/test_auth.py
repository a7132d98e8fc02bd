"""API keys and tenants against real servers: isolation on every endpoint, 401s, stored keys and
their revocation, the refusal to run open off loopback, bounds, and the rate limit shared by two
replicas through one Valkey."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import redis
import redis.asyncio

from optserve.api_key import hash_key, new_key
from optserve.cli import main
from optserve.engine.sessions import SessionService
from optserve.store import keys
from optserve.store.api_keys import ApiKeyAdmin, KeyRecord
from optserve.store.redis_store import RedisStore
from optserve.store.sweeper import sweep
from optserve.store.tenants import DEFAULT_TENANT, TENANT_FIELD, adopt_untenanted
from optserve_client import Client, OptservError, RetryPolicy

from .api_helpers import ST, assert_problem, st_body, tensor
from .conftest import KEY_A, KEY_B, ServerProcess, free_port

ROOT = Path(__file__).resolve().parents[1]
NODE = shutil.which("node")
W0 = np.arange(6, dtype=np.float32).reshape(2, 3)
G = np.full((2, 3), 0.5, np.float32)
CREATE = {"optimizer": {"name": "adam", "lr": 0.1}, "params": {"w": tensor(W0)}, "name": "mine"}
STATE_DOC = {"tensors": {"w": {"param": tensor(W0)}}}

#: Every session route: (method, path under /v1/sessions/{sid}, request options).
SESSION_ROUTES: list[tuple[str, str, dict]] = [
    ("GET", "", {}),
    ("PATCH", "", {"json": {"optimizer": {"lr": 0.5}}}),
    ("GET", "/params", {}),
    ("GET", "/params", {"params": {"after_version": 0, "wait_s": 0.1}}),
    ("PUT", "/params", {"json": {"params": {"w": tensor(G)}}}),
    ("POST", "/gradients", {"json": {"grads": {"w": tensor(G)}}}),
    ("POST", "/gradients", {"content": st_body({"w": G}), "headers": {"content-type": ST}}),
    ("GET", "/state", {}),
    ("PUT", "/state", {"json": STATE_DOC}),
    ("DELETE", "", {}),
]


def client(server: ServerProcess, key: str | None) -> httpx.Client:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.Client(base_url=server.url, headers=headers, timeout=30)


@pytest.fixture
def tenants(auth_server: ServerProcess, redis_url: str):
    with client(auth_server, KEY_A) as a, client(auth_server, KEY_B) as b:
        yield a, b


def test_another_tenant_gets_404_on_every_endpoint_and_changes_nothing(tenants) -> None:
    a, b = tenants
    created = a.post("/v1/sessions", json=CREATE)
    assert created.status_code == 201, created.text
    sid = created.json()["id"]
    before = a.get(f"/v1/sessions/{sid}/state").json()
    missing = "0" * 32  # no such session at all: what B must not be able to tell apart
    for method, path, options in SESSION_ROUTES:
        theirs = b.request(method, f"/v1/sessions/{sid}{path}", **options)
        problem = assert_problem(theirs, 404, "session_not_found")
        nothing = b.request(method, f"/v1/sessions/{missing}{path}", **options)
        same = nothing.json()
        same["detail"] = same["detail"].replace(missing, sid)
        same["request_id"] = problem["request_id"]
        assert problem == same  # the same answer, but for the id (and each request's own id)
    assert b.get("/v1/sessions").json() == {"sessions": []}
    assert [s["id"] for s in a.get("/v1/sessions").json()["sessions"]] == [sid]
    assert a.get(f"/v1/sessions/{sid}/state").json() == before  # untouched by B's writes
    # and the owner still has every endpoint
    for method, path, options in SESSION_ROUTES:
        response = a.request(method, f"/v1/sessions/{sid}{path}", **options)
        assert response.status_code in (200, 204, 304), (method, path, response.text)


def test_each_tenant_lists_only_its_own_sessions(tenants) -> None:
    a, b = tenants
    mine = {a.post("/v1/sessions", json=CREATE).json()["id"] for _ in range(2)}
    theirs = {b.post("/v1/sessions", json=CREATE).json()["id"] for _ in range(3)}
    assert {s["id"] for s in a.get("/v1/sessions").json()["sessions"]} == mine
    assert {s["id"] for s in b.get("/v1/sessions").json()["sessions"]} == theirs
    page = b.get("/v1/sessions", params={"offset": 1, "limit": 1}).json()["sessions"]
    assert len(page) == 1 and page[0]["id"] in theirs


@pytest.mark.parametrize("key", [None, "wrong-key-0123456789", "osk_0123456789ab_forged"])
def test_missing_or_bad_key_is_401_with_www_authenticate(auth_server, redis_url, key) -> None:
    with client(auth_server, KEY_A) as a:
        sid = a.post("/v1/sessions", json=CREATE).json()["id"]
    with client(auth_server, key) as anonymous:
        calls = [("POST", "", {"json": CREATE}), ("GET", "", {})]
        calls += [(m, f"/{sid}{p}", o) for m, p, o in SESSION_ROUTES]
        for method, path, options in calls:
            response = anonymous.request(method, f"/v1/sessions{path}", **options)
            assert_problem(response, 401, "unauthorized")
            challenge = response.headers["www-authenticate"]
            assert challenge.startswith("Bearer realm=")
            assert ('error="invalid_token"' in challenge) == (key is not None)
        for open_path in ("/healthz", "/readyz", "/metrics", "/openapi.json", "/docs"):
            assert anonymous.get(open_path).status_code == 200
    with client(auth_server, KEY_A) as a:
        assert a.get(f"/v1/sessions/{sid}").json()["version"] == 0  # nothing happened


def test_stored_key_works_until_revoked(auth_server, redis_url) -> None:
    admin = ApiKeyAdmin(redis.Redis.from_url(f"{redis_url}/1"))
    key_id, key = new_key()
    assert admin.add(KeyRecord(key_id, "team-c", "2026-01-01T00:00:00Z", hash_key(key)))
    assert key_id not in str(admin.client.hgetall("optserve:apikeys")).replace(key_id, "", 1)
    assert key not in str(admin.client.hgetall("optserve:apikeys"))  # only its hash is stored
    with client(auth_server, key) as c, client(auth_server, KEY_A) as a:
        sid = c.post("/v1/sessions", json=CREATE).json()["id"]
        assert c.get(f"/v1/sessions/{sid}").status_code == 200
        assert_problem(a.get(f"/v1/sessions/{sid}"), 404, "session_not_found")  # team-c's
        assert admin.revoke(key_id)
        revoked_at = time.monotonic()
        while c.get(f"/v1/sessions/{sid}").status_code != 401:
            assert time.monotonic() - revoked_at < 0.2 + 1.0, "revoked key still works"
            time.sleep(0.02)
        assert_problem(c.get("/v1/sessions"), 401, "unauthorized")
    admin.client.close()


def cli(capsys, *args: str) -> tuple[int, str, str]:
    """`optserve keys ...` in this process (its store from OPTSERVE_REDIS_URL): code, out, err."""
    with pytest.raises(SystemExit) as done:
        main(["keys", *args])
    out, err = capsys.readouterr()
    return done.value.code, out, err


def test_keys_cli_locks_an_open_server_and_revokes(
    server_factory: Callable[..., ServerProcess], redis_url: str, monkeypatch, capsys
) -> None:
    url = f"{redis_url}/2"
    server = server_factory(OPTSERVE_REDIS_URL=url, OPTSERVE_API_KEY_CACHE_S="0.2")
    with client(server, None) as anonymous:
        assert anonymous.post("/v1/sessions", json=CREATE).status_code == 201  # open on loopback
    made = subprocess.run(  # once as a real command
        [sys.executable, "-m", "optserve", "keys", "create", "--tenant", "team-c"],
        env={**server.env, "OPTSERVE_REDIS_URL": url}, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    key = made.stdout.strip()
    assert key.startswith("osk_") and len(key) > 40 and "shown once" in made.stderr
    monkeypatch.setenv("OPTSERVE_REDIS_URL", url)
    code, listed, _ = cli(capsys, "list")
    assert code == 0 and "team-c" in listed and key not in listed
    key_id = listed.splitlines()[1].split()[0]
    assert key_id in key
    assert cli(capsys, "create", "--tenant", "bad name")[0] == 2
    with client(server, None) as anonymous, client(server, key) as c:
        deadline = time.monotonic() + 2
        while anonymous.get("/v1/sessions").status_code != 401:  # the first key locks it
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert c.get("/v1/sessions").json() == {"sessions": []}  # team-c: not default's session
        assert cli(capsys, "revoke", key_id)[0] == 0
        assert cli(capsys, "revoke", key_id)[0] == 1
        deadline = time.monotonic() + 2
        while c.get("/v1/sessions").status_code != 401:  # revoked: and no key left, still locked
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert_problem(anonymous.get("/v1/sessions"), 401, "unauthorized")
    assert cli(capsys, "list")[1].splitlines()[1:] == []


def test_refuses_to_serve_a_public_address_without_keys(redis_url: str, tmp_path) -> None:
    env = {k: v for k, v in ServerProcess({}, tmp_path / "x").env.items()}
    env.pop("OPTSERVE_API_KEYS", None)
    env["OPTSERVE_REDIS_URL"] = f"{redis_url}/3"
    port = str(free_port())
    done = subprocess.run(
        [sys.executable, "-m", "optserve", "serve", "--host", "0.0.0.0", "--port", port],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode != 0
    output = done.stdout + done.stderr
    assert "OPTSERVE_API_KEYS" in output and "optserve keys create" in output
    assert "Uvicorn running" not in output
    assert "Traceback" not in output  # the advice, not a stack (server.QuietRefusal)


# -- bounds ---------------------------------------------------------------------------------------


def test_bounds_answer_413_or_422_and_create_nothing(tenants) -> None:
    a, _ = tenants
    adam = {"name": "adam"}
    cases = [
        ({"tensors": {"big": {"shape": [1001]}}}, 413, "too_many_elements"),
        ({"tensors": {"huge": {"shape": [10**6, 10**6]}}}, 413, "too_many_elements"),
        ({"tensors": {"empty": {"shape": [0, 2**40, 2**40]}}}, 413, "too_many_elements"),
        ({"tensors": {"a": {"shape": [800]}, "b": {"shape": [800]}}}, 413, "too_many_elements"),
        ({"tensors": {n: {"shape": [1]} for n in "abcd"}}, 422, "too_many_tensors"),
        ({"tensors": {"x" * 33: {"shape": [1]}}}, 422, "invalid_session"),
        ({"tensors": {"a b": {"shape": [1]}}}, 422, "invalid_session"),
        ({"tensors": {"é": {"shape": [1]}}}, 422, "invalid_session"),
        ({"tensors": {"a?b": {"shape": [1]}}}, 422, "invalid_session"),
        ({"tensors": {"d": {"shape": [1] * 65}}}, 422, "invalid_session"),
    ]
    for fields, status, code in cases:
        response = a.post("/v1/sessions", json={"optimizer": adam, **fields})
        problem = assert_problem(response, status, code)
        if code.startswith("too_many"):
            assert problem["setting"].startswith("OPTSERVE_MAX_") and problem["limit"] > 0
    ok = {"optimizer": adam, "tensors": {"layer.0/w:0-x_y": {"shape": [1000]}}}
    assert a.post("/v1/sessions", json=ok).status_code == 201  # at the bounds: allowed
    assert len(a.get("/v1/sessions").json()["sessions"]) == 1
    big = {"optimizer": adam, "params": {"w": tensor(np.zeros(30_000, np.float32))}}
    assert_problem(a.post("/v1/sessions", json=big), 413, "payload_too_large")


def test_sessions_per_tenant_bound_is_per_tenant_and_freed_by_delete(tenants) -> None:
    a, b = tenants
    ids = [a.post("/v1/sessions", json=CREATE).json()["id"] for _ in range(4)]
    assert_problem(a.post("/v1/sessions", json=CREATE), 422, "too_many_sessions")
    assert b.post("/v1/sessions", json=CREATE).status_code == 201  # team-b has its own bound
    assert a.delete(f"/v1/sessions/{ids[0]}").status_code == 204
    assert a.post("/v1/sessions", json=CREATE).status_code == 201


def test_expired_sessions_leave_the_tenant_index(tenants, redis_url) -> None:
    a, _ = tenants
    ids = [a.post("/v1/sessions", json={**CREATE, "ttl_s": 0.2}).json()["id"] for _ in range(2)]
    kept = [a.post("/v1/sessions", json=CREATE).json()["id"] for _ in range(2)]
    time.sleep(0.4)  # two expired: the tenant is at its bound of 4 only by their entries
    fresh = a.post("/v1/sessions", json=CREATE)  # a full index is pruned before it refuses
    assert fresh.status_code == 201, fresh.text
    listed = [s["id"] for s in a.get("/v1/sessions").json()["sessions"]]
    assert listed == [*kept, fresh.json()["id"]] and not set(ids) & set(listed)
    with redis.Redis.from_url(f"{redis_url}/1") as raw:
        raw.zadd("optserve:tenant:team-b:sessions", {"f" * 32: 1})  # a session half-created
        asyncio.run(_sweep(f"{redis_url}/1"))  # the sweeper's pass prunes every tenant's index
        assert raw.zcard("optserve:tenant:team-b:sessions") == 0
        assert raw.zcard("optserve:tenant:team-a:sessions") == 3


async def _sweep(url: str) -> None:
    store = RedisStore.from_url(url)
    try:
        await sweep(store)
    finally:
        await store.close()


def test_lying_bodies_are_4xx_before_any_allocation(tenants) -> None:
    a, _ = tenants
    sid = a.post("/v1/sessions", json=CREATE).json()["id"]
    header = b'{"w":{"dtype":"F32","shape":[0,1180591620717411303424],"data_offsets":[0,0]}}'
    json = "application/json"
    bodies = [
        (len(header).to_bytes(8, "little") + header, ST),
        ((10**12).to_bytes(8, "little") + b"{}", ST),  # header length past the body
        (b'{"grads": {"w": {"shape": [0, 1099511627776, 1099511627776], "data": []}}}', json),
        (b'{"grads": {"w": {"shape": [100000, 100000], "data": [1]}}}', json),
    ]
    for body, media_type in bodies:
        response = a.post(
            f"/v1/sessions/{sid}/gradients", content=body, headers={"content-type": media_type}
        )
        assert_problem(response, 400, "invalid_body")
    assert a.get(f"/v1/sessions/{sid}").json()["version"] == 0


# -- rate limit -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def replicas(valkey_server, tmp_path_factory) -> Iterator[list[ServerProcess]]:
    """Two servers on one Valkey (database 4), 2 requests/s per key with bursts of 4."""
    env = {
        "OPTSERVE_REDIS_URL": f"{valkey_server.url}/4",
        "OPTSERVE_API_KEYS": f"team-a:{KEY_A},team-b:{KEY_B}",
        "OPTSERVE_RATE_LIMIT_PER_S": "2",
        "OPTSERVE_RATE_LIMIT_BURST": "4",
    }
    logs = tmp_path_factory.mktemp("replicas")
    servers = [ServerProcess(env, logs / f"optserve-{i}.log") for i in range(2)]
    try:
        with ThreadPoolExecutor(2) as pool:  # start both at once
            started = list(pool.map(ServerProcess.start, servers))
        yield started
    finally:
        for server in servers:
            server.stop()


def test_rate_limit_is_shared_by_two_replicas(replicas, redis_url: str) -> None:
    first, second = replicas
    with client(first, KEY_A) as a1, client(second, KEY_A) as a2, client(first, KEY_B) as b1:
        answers = [c.get("/v1/sessions") for c in (a1, a2) * 4]  # 8 requests well within 1 s
        statuses = [r.status_code for r in answers]
        assert statuses.count(200) in (4, 5), statuses  # the burst of 4 (+1 refilled at most)
        limited = [r for r in answers if r.status_code == 429]
        assert {r.request.url.port for r in limited} == {first.port, second.port}
        problem = assert_problem(limited[-1], 429, "rate_limited")
        retry_after = int(limited[-1].headers["retry-after"])
        assert retry_after >= 1 and problem["retry_after_s"] == retry_after
        assert b1.get("/v1/sessions").status_code == 200  # another key has its own budget
        time.sleep(retry_after)
        assert a2.get("/v1/sessions").status_code == 200  # Retry-After was enough


JS_CHECK = """
import { Client, OptservError } from "%s";
const [url, key] = process.argv.slice(1);
const retries = { attempts: 6, backoffMs: 10 };
const keyed = new Client({ url, apiKey: key, codec: "json", retries });
for (let i = 0; i < 6; i++) await keyed.listSessions({ limit: 1 });  // past the burst: 429s retried
const out = {};
for (const [name, apiKey] of [["none", undefined], ["bad", "not-a-key-0123456789"]]) {
  try {
    await new Client({ url, apiKey }).listSessions({ limit: 1 });
    out[name] = "no error";
  } catch (error) {
    out[name] = error instanceof OptservError ? [error.status, error.code] : String(error);
  }
}
console.log(JSON.stringify(out));
"""


def test_clients_send_their_key_retry_429_and_surface_401(replicas, redis_url: str) -> None:
    server = replicas[0]
    started = time.monotonic()
    with Client(server.url, KEY_A, retries=RetryPolicy(attempts=6, backoff=0.01)) as keyed:
        for _ in range(6):  # a burst of 4 at 2/s: the last two wait for their Retry-After
            keyed.list_sessions(limit=1)
    assert time.monotonic() - started >= 0.9
    with Client(server.url, KEY_A, retries=0) as impatient, pytest.raises(OptservError) as limited:
        impatient.list_sessions(limit=1)
    assert (limited.value.status, limited.value.code) == (429, "rate_limited")
    for key in (None, "not-a-key-0123456789"):
        with Client(server.url, key) as stranger, pytest.raises(OptservError) as refused:
            stranger.list_sessions(limit=1)
        assert (refused.value.status, refused.value.code) == (401, "unauthorized")
    if NODE is None:
        return
    script = JS_CHECK % (ROOT / "clients" / "js" / "src" / "index.js").as_uri()
    done = subprocess.run(
        [NODE, "--input-type=module", "-e", script, server.url, KEY_B],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"none": [401, "unauthorized"], "bad": [401, "unauthorized"]}


def test_keys_cli_on_the_embedded_store_running_or_not(
    server_factory: Callable[..., ServerProcess], tmp_path, monkeypatch, capsys
) -> None:
    data_dir = tmp_path / "data"
    monkeypatch.delenv("OPTSERVE_REDIS_URL", raising=False)
    monkeypatch.setenv("OPTSERVE_DATA_DIR", str(data_dir))
    server = server_factory(OPTSERVE_REDIS_URL=None, OPTSERVE_DATA_DIR=str(data_dir))
    code, key, _ = cli(capsys, "create", "--tenant", "team-e")  # beside the running server
    assert code == 0
    with client(server, None) as anonymous, client(server, key.strip()) as c:
        deadline = time.monotonic() + 3
        while anonymous.get("/v1/sessions").status_code != 401:  # the server saw the key
            assert time.monotonic() < deadline
            time.sleep(0.05)
        sid = c.post("/v1/sessions", json=CREATE).json()["id"]
        assert [s["id"] for s in c.get("/v1/sessions").json()["sessions"]] == [sid]
    server.stop()
    code, listed, _ = cli(capsys, "list")  # the server is gone: the CLI runs the store itself
    assert code == 0 and "team-e" in listed
    assert not (data_dir / "valkey.pid").exists()  # and stops it again


def test_sessions_from_before_tenants_are_adopted_by_default(redis_url: str) -> None:
    async def scenario() -> None:
        store = RedisStore.from_url(redis_url)
        service = SessionService(store)
        raw = redis.asyncio.Redis.from_url(redis_url)
        try:
            fields = {"optimizer": {"name": "sgd", "lr": 0.1}}
            old = (await service.create(fields, {"w": np.ones(2, np.float32)}))["id"]
            # as an older optserve left it: no tenant in the meta, only the global index
            await raw.hdel(keys.meta_key(old), TENANT_FIELD)
            await raw.zrem(keys.tenant_sessions_key(DEFAULT_TENANT), old)
            await raw.zadd(keys.SESSION_INDEX, {"e" * 32: 1})  # and one long gone
            assert await service.list() == []
            assert await adopt_untenanted(raw) == 1
            assert [s["id"] for s in await service.list()] == [old]
            assert await raw.hget(keys.meta_key(old), TENANT_FIELD) == b"default"
            assert not await raw.exists(keys.meta_key("e" * 32))  # not brought back as a husk
            assert await adopt_untenanted(raw) == 0
        finally:
            await service.close()
            await store.close()
            await raw.aclose()

    asyncio.run(scenario())


def test_absurd_ttl_is_422_not_500(tenants) -> None:  # found by schemathesis
    a, _ = tenants
    for ttl_s in (1.7976931348623155e308, 1e20, -5.968664553840549e307, 0.05):
        response = a.post("/v1/sessions", json={**CREATE, "ttl_s": ttl_s})
        assert_problem(response, 422, "invalid_session")
    sid = a.post("/v1/sessions", json=CREATE).json()["id"]
    assert_problem(a.patch(f"/v1/sessions/{sid}", json={"ttl_s": 1e300}), 422, "invalid_session")
    assert a.get(f"/v1/sessions/{sid}").json()["ttl_s"] is None
