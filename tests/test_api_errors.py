"""Every error code of the API: the right status and problem+json body, and nothing changed."""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest

from .api_helpers import ST, assert_problem, create, push, st_body, state, tensor

W0 = np.linspace(-1, 1, 6, dtype=np.float32).reshape(2, 3)


@pytest.fixture
def client(api_url):
    with httpx.Client(base_url=api_url, timeout=60) as client:
        yield client


@pytest.fixture
def sid(client):
    """An Adam session that has taken one step, so it has moments that an error could damage."""
    sid = create(client, {"name": "adam", "lr": 0.01}, {"w": W0, "b": np.zeros(3, np.float32)})[
        "id"
    ]
    push(client, sid, {"w": np.ones((2, 3), np.float32)})
    return sid


def grads_path(sid: str) -> str:
    return f"/v1/sessions/{sid}/gradients"


@pytest.mark.parametrize(
    ("content", "content_type", "code", "status"),
    [
        (b'{"grads": {"w": ', "application/json", "invalid_body", 400),
        (b"[1, 2]", "application/json", "invalid_body", 400),
        (
            b'{"grads": {"w": {"shape": [2, 3], "data": [1, 2]}}}',
            "application/json",
            "invalid_body",
            400,
        ),
        (
            b'{"grads": {"w": {"shape": [2, 3], "data": [1, 2, "x", 4, 5, 6]}}}',
            "application/json",
            "invalid_body",
            400,
        ),
        (
            b'{"grads": {"w": {"shape": [2, -3], "data": []}}}',
            "application/json",
            "invalid_body",
            400,
        ),
        (b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}", ST, "invalid_body", 400),
        (b"\xff\xff\xff\xff\x00\x00\x00\x00", ST, "invalid_body", 400),
        (b"w=1", "text/plain", "unsupported_media_type", 415),
        (
            b'{"grads": {"zz": {"shape": [1], "data": [1]}}}',
            "application/json",
            "unknown_tensor",
            422,
        ),
        (
            b'{"grads": {"w": {"shape": [3, 2], "data": [1, 2, 3, 4, 5, 6]}}}',
            "application/json",
            "shape_mismatch",
            422,
        ),
        (
            b'{"grads": {"w": {"shape": [2, 3], "data": [1, 2, 3, 4, 5, 1e39]}}}',
            "application/json",
            "non_finite",
            422,
        ),
        (b'{"grads": {}}', "application/json", "invalid_session", 422),
        (
            b'{"grads": {"w": {"shape": [2, 3], "data": [1, 2, 3, 4, 5, 6]}}, "bogus": 1}',
            "application/json",
            "invalid_session",
            422,
        ),
        (
            b'{"grads": {"w": {"shape": [2, 3], "data": [1, 2, 3, 4, 5, 6]}}, "base_version": -1}',
            "application/json",
            "invalid_session",
            422,
        ),
    ],
)
def test_bad_push_is_refused_and_changes_nothing(client, sid, content, content_type, code, status):
    before = state(client, sid)
    response = client.post(grads_path(sid), content=content, headers={"content-type": content_type})
    assert_problem(response, status, code)
    assert state(client, sid) == before


def test_nan_gradient_in_safetensors_is_non_finite(client, sid):
    before = state(client, sid)
    bad = np.ones((2, 3), np.float32)
    bad[1, 2] = np.inf
    problem = assert_problem(
        client.post(grads_path(sid), content=st_body({"w": bad}), headers={"content-type": ST}),
        422,
        "non_finite",
    )
    assert problem["tensors"] == ["w"]
    assert state(client, sid) == before


def test_non_finite_params_are_refused(client, sid):
    before = state(client, sid)
    body = {"optimizer": {"name": "sgd"}, "params": {"w": {"shape": [2], "data": [1, 1e39]}}}
    assert_problem(client.post("/v1/sessions", json=body), 422, "non_finite")
    put = client.put(
        f"/v1/sessions/{sid}/params", json={"params": {"b": {"shape": [3], "data": [0, 1e39, 0]}}}
    )
    assert_problem(put, 422, "non_finite")
    assert state(client, sid) == before


def test_unknown_session_is_404_everywhere(client):
    missing = "no-such-session"
    for response in (
        client.get(f"/v1/sessions/{missing}"),
        client.patch(f"/v1/sessions/{missing}", json={"optimizer": {"lr": 0.1}}),
        client.delete(f"/v1/sessions/{missing}"),
        client.get(f"/v1/sessions/{missing}/params"),
        client.put(f"/v1/sessions/{missing}/params", json={"params": {"w": tensor(W0)}}),
        client.post(grads_path(missing), json={"grads": {"w": tensor(W0)}}),
        client.get(f"/v1/sessions/{missing}/state"),
    ):
        assert_problem(response, 404, "session_not_found")


def test_stale_if_match_is_412_and_changes_nothing(client, sid):
    before = state(client, sid)
    body = {"params": {"w": tensor(np.zeros((2, 3), np.float32))}}
    response = client.put(f"/v1/sessions/{sid}/params", json=body, headers={"if-match": '"0"'})
    assert assert_problem(response, 412, "precondition_failed")["version"] == 1
    doc = client.get(f"/v1/sessions/{sid}/state").json()
    response = client.put(f"/v1/sessions/{sid}/state", json=doc, headers={"if-match": '"7"'})
    assert_problem(response, 412, "precondition_failed")
    assert state(client, sid) == before


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({"optimizer": {"name": "adamm"}, "params": {"w": tensor(W0)}}, "unknown_optimizer"),
        (
            {"optimizer": {"name": "adam", "lr": -1}, "params": {"w": tensor(W0)}},
            "invalid_hyperparameter",
        ),
        (
            {"optimizer": {"name": "adam", "betas": [1.5, 0.9]}, "params": {"w": tensor(W0)}},
            "invalid_hyperparameter",
        ),
        (
            {"optimizer": {"name": "sgd", "nesterov": True}, "params": {"w": tensor(W0)}},
            "invalid_hyperparameter",
        ),
        (
            {"optimizer": {"name": "adam", "momentum": 0.9}, "params": {"w": tensor(W0)}},
            "invalid_hyperparameter",
        ),
        (
            {
                "optimizer": {"name": "adam"},
                "params": {"w": tensor(W0)},
                "lr_schedule": {"type": "step"},
            },
            "invalid_hyperparameter",
        ),
        (
            {"optimizer": {"name": "adam"}, "params": {"w": tensor(W0)}, "clip_grad_norm": -1},
            "invalid_hyperparameter",
        ),
        ({"optimizer": {"name": "adam"}}, "invalid_session"),
        ({"params": {"w": tensor(W0)}}, "invalid_session"),
        (
            {
                "optimizer": {"name": "adam"},
                "params": {"w": tensor(W0)},
                "mode": {"type": "gossip"},
            },
            "invalid_session",
        ),
        (
            {"optimizer": {"name": "adam"}, "params": {"w": tensor(W0)}, "nonfinite": "ignore"},
            "invalid_session",
        ),
        (
            {"optimizer": {"name": "adam"}, "params": {"w": tensor(W0)}, "colour": "blue"},
            "invalid_session",
        ),
        ({"optimizer": {"name": "adam"}, "tensors": {"e": {"shape": [2, "x"]}}}, "invalid_session"),
        ({"optimizer": {"name": "adam"}, "params": {"a b": tensor(W0)}}, "invalid_session"),
        ({"optimizer": {"name": "adam"}, "params": {"a,b": tensor(W0)}}, "invalid_session"),
        (
            {"optimizer": {"name": "adam"}, "params": {"__metadata__": tensor(W0)}},
            "invalid_session",
        ),
    ],
)
def test_bad_session_is_refused_and_nothing_is_created(client, body, code):
    count = len(client.get("/v1/sessions", params={"limit": 1000}).json()["sessions"])
    problem = assert_problem(client.post("/v1/sessions", json=body), 422, code)
    if code == "invalid_hyperparameter":
        assert problem["field"] and problem["allowed"]
    assert len(client.get("/v1/sessions", params={"limit": 1000}).json()["sessions"]) == count


def test_bad_patch_changes_nothing(client, sid):
    before = client.get(f"/v1/sessions/{sid}").json()
    for body, code in [
        ({"optimizer": {"lr": -0.1}}, "invalid_hyperparameter"),
        ({"optimizer": {"amsgrad": True}}, "invalid_hyperparameter"),
        ({"optimizer": {"name": "sgd"}}, "invalid_hyperparameter"),
        ({"tensors": {}}, "invalid_session"),
    ]:
        assert_problem(client.patch(f"/v1/sessions/{sid}", json=body), 422, code)
    assert client.get(f"/v1/sessions/{sid}").json() == before


def test_not_acceptable(client, sid):
    response = client.get(f"/v1/sessions/{sid}/params", headers={"accept": "text/html"})
    assert_problem(response, 406, "not_acceptable")


def test_payload_too_large(server_factory, valkey_server):
    server = server_factory(OPTSERVE_REDIS_URL=valkey_server.url, OPTSERVE_MAX_BODY_BYTES="2000")
    with httpx.Client(base_url=server.url) as client:
        sid = create(client, {"name": "sgd"}, {"w": np.zeros(100, np.float32)})["id"]
        before = state(client, sid)
        big = {"grads": {"w": tensor(np.full(1000, 0.123456, np.float32))}}
        assert_problem(client.post(grads_path(sid), json=big), 413, "payload_too_large")

        def chunks():  # no Content-Length: the limit must hold while streaming
            yield b'{"grads": {"w": {"shape": [100], "data": ['
            for _ in range(500):
                yield b"0.5, "
            yield b"0.5]}}}"

        response = client.post(
            grads_path(sid), content=chunks(), headers={"content-type": "application/json"}
        )
        assert_problem(response, 413, "payload_too_large")
        assert state(client, sid) == before


def test_json_bodies_have_their_own_smaller_limit(server_factory, valkey_server):
    """JSON is parsed whole into Python objects (many times its size), so it is refused past
    OPTSERVE_MAX_JSON_BODY_BYTES while the same tensor as safetensors still goes through."""
    server = server_factory(
        OPTSERVE_REDIS_URL=valkey_server.url,
        OPTSERVE_MAX_BODY_BYTES="6000",
        OPTSERVE_MAX_JSON_BODY_BYTES="2000",
    )
    with httpx.Client(base_url=server.url) as client:
        declared = {"optimizer": {"name": "sgd", "lr": 0.5}, "tensors": {"w": {"shape": [1000]}}}
        created = client.post("/v1/sessions", json=declared)
        assert created.status_code == 201, created.text
        sid = created.json()["id"]
        before = state(client, sid)
        as_json = json.dumps({"grads": {"w": tensor(np.zeros(1000, np.float32))}}).encode()
        assert 2000 < len(as_json) < 6000
        response = client.post(
            grads_path(sid), content=as_json, headers={"content-type": "application/json"}
        )
        assert_problem(response, 413, "payload_too_large")
        assert state(client, sid) == before

        as_safetensors = st_body({"w": np.ones(1000, np.float32)})
        assert 2000 < len(as_safetensors) < 6000
        response = client.post(
            grads_path(sid),
            content=as_safetensors,
            headers={"content-type": f"{ST}; charset=binary"},
        )
        assert response.status_code == 200, response.text
        assert response.json()["version"] == 1


def test_store_outage_is_503_and_recovers_without_restart(server_factory, tmp_path):
    from optserve.store.embedded import EmbeddedValkey

    store = EmbeddedValkey(tmp_path / "outage-store")
    store.start()
    try:
        server = server_factory(OPTSERVE_REDIS_URL=store.url)
        with httpx.Client(base_url=server.url, timeout=30) as client:
            sid = create(client, {"name": "adam"}, {"w": W0})["id"]
            push(client, sid, {"w": np.ones((2, 3), np.float32)})
            before = state(client, sid)
            store.stop()
            response = client.post(grads_path(sid), json={"grads": {"w": tensor(W0)}})
            assert_problem(response, 503, "store_unavailable")
            assert response.headers["retry-after"]
            assert_problem(client.get("/readyz"), 503, "store_unavailable")
            store.start()
            assert client.get("/readyz").status_code == 200
            assert state(client, sid) == before
            assert push(client, sid, {"w": np.ones((2, 3), np.float32)})["version"] == 2
    finally:
        store.stop()


def test_cors_for_configured_origins_only(server_factory, valkey_server):
    server = server_factory(
        OPTSERVE_REDIS_URL=valkey_server.url, OPTSERVE_CORS_ORIGINS='["https://app.example"]'
    )
    with httpx.Client(base_url=server.url) as client:
        preflight = client.options(
            "/v1/sessions",
            headers={
                "origin": "https://app.example",
                "access-control-request-method": "POST",
                "access-control-request-headers": "content-type,idempotency-key",
            },
        )
        assert preflight.status_code == 200
        assert preflight.headers["access-control-allow-origin"] == "https://app.example"
        sid = create(client, {"name": "sgd"}, {"w": W0})["id"]
        pulled = client.get(f"/v1/sessions/{sid}/params", headers={"origin": "https://app.example"})
        exposed = pulled.headers["access-control-expose-headers"].lower()
        assert "etag" in exposed and "idempotency-replayed" in exposed
        assert "x-request-id" in exposed and pulled.headers["x-request-id"]
        assert preflight.headers["x-request-id"]  # the preflight, answered by CORS, has one too
        other = client.get("/healthz", headers={"origin": "https://evil.example"})
        assert "access-control-allow-origin" not in other.headers
