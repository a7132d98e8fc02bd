"""Idempotent retries, bounded staleness and group commit, over real HTTP."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest

from .api_helpers import assert_problem, create, from_json, push, state, tensor

W0 = np.zeros(4, np.float32)


@pytest.fixture
def client(engine_api_url):
    """Every test here runs against both engines (the `engine` fixture's params)."""
    with httpx.Client(base_url=engine_api_url, timeout=60) as client:
        yield client


def sgd_session(client, **fields) -> str:
    return create(client, {"name": "sgd", "lr": 0.5}, {"w": W0}, **fields)["id"]


def keyed_push(client, sid, grad, key, **fields) -> httpx.Response:
    body = json.dumps({"grads": {"w": tensor(grad)}, **fields})
    return client.post(
        f"/v1/sessions/{sid}/gradients",
        content=body,
        headers={"content-type": "application/json", "idempotency-key": key},
    )


# -- idempotency -----------------------------------------------------------------------------------


def test_a_retried_key_returns_the_first_response_and_applies_nothing(client):
    sid = sgd_session(client)
    grad = np.ones(4, np.float32)
    first = keyed_push(client, sid, grad, "push-1")
    assert first.status_code == 200 and "idempotency-replayed" not in first.headers
    again = keyed_push(client, sid, grad, "push-1")
    assert again.status_code == 200 and again.headers["idempotency-replayed"] == "true"
    assert again.json()["version"] == first.json()["version"] == 1
    assert again.json()["applied"] is True
    assert again.json()["params"] == first.json()["params"]  # nothing happened in between
    assert again.json()["params_version"] == 1 and again.headers["etag"] == '"1"'
    assert client.get(f"/v1/sessions/{sid}").json()["version"] == 1  # applied once
    other = keyed_push(client, sid, grad, "push-2")
    assert other.json()["version"] == 2


def test_the_same_key_with_another_body_is_refused(client):
    sid = sgd_session(client)
    keyed_push(client, sid, np.ones(4, np.float32), "k")
    before = state(client, sid)
    response = keyed_push(client, sid, np.full(4, 2, np.float32), "k")
    assert_problem(response, 422, "idempotency_key_reused")
    assert state(client, sid) == before


def test_concurrent_requests_with_one_key_apply_once(client, engine_api_url):
    sid = sgd_session(client)
    grad = np.full(4, 0.25, np.float32)

    def send(_):
        with httpx.Client(base_url=engine_api_url, timeout=60) as own:
            return keyed_push(own, sid, grad, "same-key")

    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(send, range(8)))
    assert all(r.status_code == 200 for r in responses)
    assert {r.json()["version"] for r in responses} == {1}
    assert sum("idempotency-replayed" not in r.headers for r in responses) >= 1
    params = client.get(f"/v1/sessions/{sid}/params").json()["params"]
    np.testing.assert_array_equal(from_json(params["w"]), W0 - np.float32(0.5) * grad)


def test_a_key_is_honoured_by_every_replica(two_replicas):
    """The record lives in Redis, written with the commit: a retry to another process replays."""
    first, second = two_replicas
    with httpx.Client(base_url=first.url) as a, httpx.Client(base_url=second.url) as b:
        sid = sgd_session(a)
        grad = np.ones(4, np.float32)
        assert keyed_push(a, sid, grad, "cross").json()["version"] == 1
        push(a, sid, {"w": grad})  # version 2: the replay's params are the current ones
        replay = keyed_push(b, sid, grad, "cross")
        assert replay.headers["idempotency-replayed"] == "true"
        assert replay.json()["version"] == 1 and replay.json()["params_version"] == 2
        assert replay.headers["etag"] == '"2"'
        assert b.get(f"/v1/sessions/{sid}").json()["version"] == 2


# -- staleness -------------------------------------------------------------------------------------


def test_stale_gradients_are_refused_with_the_current_version(client):
    sid = sgd_session(client, max_staleness=2)
    for _ in range(3):
        push(client, sid, {"w": np.ones(4, np.float32)})
    before = state(client, sid)
    response = client.post(
        f"/v1/sessions/{sid}/gradients",
        json={"grads": {"w": tensor(np.ones(4, np.float32))}, "base_version": 0},
    )
    problem = assert_problem(response, 409, "stale_gradient")
    assert problem["version"] == 3 and problem["staleness"] == 3 and problem["max_staleness"] == 2
    assert state(client, sid) == before
    ok = push(client, sid, {"w": np.ones(4, np.float32)}, base_version=1)
    assert ok["version"] == 4 and ok["staleness"] == 2


def test_stale_gradients_can_be_scaled_instead(client):
    sid = sgd_session(client, max_staleness=1, staleness="scale")
    push(client, sid, {"w": np.ones(4, np.float32)})
    push(client, sid, {"w": np.ones(4, np.float32)})
    push(client, sid, {"w": np.ones(4, np.float32)})  # w = -1.5
    result = push(client, sid, {"w": np.ones(4, np.float32)}, base_version=0)  # 3 behind
    assert result["staleness"] == 3
    expected = np.float32(-1.5) - np.float32(0.5 / 4) * np.float32(1)  # lr / (1 + staleness)
    np.testing.assert_array_equal(from_json(result["params"]["w"]), np.full(4, expected))


def test_base_version_from_the_future_is_refused(client):
    sid = sgd_session(client)
    response = client.post(
        f"/v1/sessions/{sid}/gradients",
        json={"grads": {"w": tensor(np.ones(4, np.float32))}, "base_version": 5},
    )
    assert_problem(response, 422, "invalid_session")


def test_staleness_settings_are_validated_and_patchable(client):
    bad = {"optimizer": {"name": "sgd"}, "params": {"w": tensor(W0)}, "max_staleness": -1}
    assert_problem(client.post("/v1/sessions", json=bad), 422, "invalid_session")
    sid = sgd_session(client)
    patched = client.patch(f"/v1/sessions/{sid}", json={"max_staleness": 4, "staleness": "scale"})
    assert patched.json()["max_staleness"] == 4 and patched.json()["staleness"] == "scale"


# -- group commit ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("engine", "group_commit"),
    [("write-through", "true"), ("write-through", "false"), ("hot", "true")],
)  # the hot engine's path is the same with batches of one: not run twice for time
def test_concurrent_pushes_lose_nothing_with_group_commit_on_and_off(
    server_factory, engine_env, engine_api_server, group_commit
):
    if group_commit == "true":  # the default: the shared server of the engine has it
        server = engine_api_server
    else:
        server = server_factory(**engine_env, OPTSERVE_GROUP_COMMIT=group_commit)
    with httpx.Client(base_url=server.url) as client:
        sid = create(client, {"name": "adagrad", "lr": 0.5}, {"w": W0})["id"]
    grads = [np.full(4, (k % 8 + 1) / 8, np.float32) for k in range(48)]

    def send(grad):
        with httpx.Client(base_url=server.url, timeout=60) as own:
            return push(own, sid, {"w": grad}, base_version=0)["version"]

    with ThreadPoolExecutor(12) as pool:
        versions = list(pool.map(send, grads))
    assert sorted(versions) == list(range(1, 49))  # every push its own step, none lost
    with httpx.Client(base_url=server.url) as client:
        exported = client.get(f"/v1/sessions/{sid}/state").json()["tensors"]["w"]
    expected_sum = sum(g.astype(np.float64) ** 2 for g in grads).astype(np.float32)
    np.testing.assert_array_equal(from_json(exported["sum"]), expected_sum)
    assert exported["step"] == 48.0
