"""The REST API over real HTTP against a real optserve process and a real Valkey."""

from __future__ import annotations

import re
import threading
import time

import httpx
import numpy as np
import pytest

from optserve.optim import get_algorithm
from optserve.optim.update import apply_update, initial_states

from .api_helpers import (
    ST,
    assert_problem,
    create,
    from_json,
    push,
    st_body,
    st_parse,
    state,
    tensor,
)


@pytest.fixture
def client(engine_api_url):
    """Every test here runs against both engines (the `engine` fixture's params)."""
    with httpx.Client(base_url=engine_api_url, timeout=60) as client:
        yield client


W0 = np.arange(6, dtype=np.float32).reshape(2, 3) / 7
B0 = np.array([0.5, -0.25, 1.0], dtype=np.float32)


def adam_session(client, **fields) -> str:
    return create(client, {"name": "adam", "lr": 0.01}, {"w": W0, "b": B0}, **fields)["id"]


# -- sessions --------------------------------------------------------------------------------------


def test_create_returns_the_session_with_defaults_filled(client):
    response = client.post(
        "/v1/sessions",
        json={
            "optimizer": {"name": "adam", "lr": 0.01},
            "params": {"w": tensor(W0)},
            "tensors": {"emb": {"shape": [10, 4]}},
            "name": "run-3",
        },
    )
    assert response.status_code == 201
    session = response.json()
    assert response.headers["location"] == f"/v1/sessions/{session['id']}"
    # unguessable (128 random bits) and safe as a command-line argument (never starts with "-")
    assert re.fullmatch(r"[0-9a-f]{32}", session["id"])
    assert session["version"] == 0 and session["name"] == "run-3"
    assert session["optimizer"] == {
        "name": "adam", "lr": 0.01, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.0,
        "amsgrad": False, "maximize": False, "decoupled_weight_decay": False,
    }  # fmt: skip
    assert session["tensors"] == {
        "w": {"shape": [2, 3], "dtype": "float32"},
        "emb": {"shape": [10, 4], "dtype": "float32"},
    }
    assert session["mode"] == {"type": "async"}
    assert session["created_at"] and session["updated_at"]
    params = client.get(f"/v1/sessions/{session['id']}/params").json()["params"]
    np.testing.assert_array_equal(from_json(params["emb"]), np.zeros((10, 4), np.float32))
    assert client.get(f"/v1/sessions/{session['id']}").json() == session


def test_create_with_safetensors_body(client):
    body = st_body({"w": W0}, optimizer={"name": "sgd", "lr": 0.1}, name="bin")
    response = client.post("/v1/sessions", content=body, headers={"content-type": ST})
    assert response.status_code == 201, response.text
    sid = response.json()["id"]
    tensors, fields = st_parse(
        client.get(f"/v1/sessions/{sid}/params", headers={"accept": ST}).content
    )
    np.testing.assert_array_equal(tensors["w"], W0)
    assert fields == {"version": 0}


def test_list_patch_and_delete(client, redis_url):
    sid = adam_session(client, name="to-delete")
    assert sid in [s["id"] for s in client.get("/v1/sessions").json()["sessions"]]
    patched = client.patch(f"/v1/sessions/{sid}", json={"optimizer": {"lr": 0.5}, "name": "x"})
    assert patched.status_code == 200, patched.text
    assert patched.json()["optimizer"]["lr"] == 0.5 and patched.json()["lr"] == 0.5
    assert patched.json()["name"] == "x" and patched.json()["version"] == 0
    assert client.delete(f"/v1/sessions/{sid}").status_code == 204
    assert_problem(client.get(f"/v1/sessions/{sid}"), 404, "session_not_found")
    assert sid not in [s["id"] for s in client.get("/v1/sessions").json()["sessions"]]
    import redis

    leftover = list(redis.Redis.from_url(redis_url).scan_iter(match=f"optserve:{{{sid}}}*"))
    assert leftover == []


# -- pushing ---------------------------------------------------------------------------------------


def test_push_json_and_safetensors_give_the_same_result(client):
    grads = {"w": np.full((2, 3), 0.3, np.float32), "b": np.array([1, -1, 0], np.float32)}
    a, b = adam_session(client), adam_session(client)
    json_result = push(client, a, grads)
    response = client.post(
        f"/v1/sessions/{b}/gradients",
        content=st_body(grads, base_version=0, worker="w1"),
        headers={"content-type": ST, "accept": ST},
    )
    assert response.status_code == 200, response.text
    assert response.headers["etag"] == '"1"'
    st_tensors, st_fields = st_parse(response.content)
    assert st_fields == {"version": 1, "applied": True, "staleness": 0, "lr": 0.01}
    assert json_result["version"] == 1 and json_result["applied"] is True
    for name in grads:
        np.testing.assert_array_equal(from_json(json_result["params"][name]), st_tensors[name])
    assert state(client, a) == state(client, b)


def test_absent_tensor_is_skipped_and_return_modes(client):
    sid = adam_session(client)
    result = push(client, sid, {"w": np.ones((2, 3), np.float32)})
    np.testing.assert_array_equal(from_json(result["params"]["b"]), B0)  # untouched
    pushed = client.post(
        f"/v1/sessions/{sid}/gradients?return=pushed",
        json={"grads": {"b": tensor(np.zeros(3, np.float32))}},
    ).json()
    assert set(pushed["params"]) == {"b"} and pushed["version"] == 2
    none = client.post(
        f"/v1/sessions/{sid}/gradients?return=none", json={"grads": {"w": tensor(W0)}}
    ).json()
    assert none == {"version": 3, "applied": True, "lr": 0.01, "params": {}}
    exported = client.get(f"/v1/sessions/{sid}/state").json()["tensors"]
    assert exported["w"]["step"] == 2.0 and exported["b"]["step"] == 1.0  # per-tensor steps


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("sgd", {"lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 0.01}),
        ("adam", {"lr": 0.01, "amsgrad": True, "weight_decay": 0.1}),
        ("adamw", {"lr": 0.01}),
        ("rmsprop", {"lr": 0.01, "centered": True, "momentum": 0.5}),
        ("adagrad", {"lr": 0.1, "lr_decay": 0.01, "initial_accumulator_value": 0.1}),
        ("nadam", {"lr": 0.01, "decoupled_weight_decay": True, "weight_decay": 0.1}),
        ("radam", {"lr": 0.01}),
        ("adamax", {"lr": 0.01}),
        ("lion", {"lr": 0.001, "weight_decay": 0.1}),
    ],
)
def test_rest_results_equal_the_optimizer_core(client, name, options):
    """Through HTTP, JSON floats and Redis, the numbers are the core's to the last bit."""
    rng = np.random.default_rng(5)
    initial = {"w": rng.standard_normal((3, 4)).astype(np.float32), "b": np.zeros(4, np.float32)}
    sid = create(client, {"name": name, **options}, initial)["id"]
    algorithm = get_algorithm(name)
    hp = algorithm.configure(options)
    params = {k: v.copy() for k, v in initial.items()}
    states = initial_states(algorithm, hp, params)
    for step in range(6):
        grads = {"w": rng.standard_normal((3, 4)).astype(np.float32)}
        if step % 2 == 0:
            grads["b"] = rng.standard_normal(4).astype(np.float32)
        served = push(client, sid, grads)
        apply_update(
            algorithm, hp, params, {k: v.copy() for k, v in grads.items()}, states, hp["lr"]
        )
        for tensor_name, value in params.items():
            np.testing.assert_array_equal(from_json(served["params"][tensor_name]), value)
    exported = client.get(f"/v1/sessions/{sid}/state").json()["tensors"]
    for tensor_name, local in states.items():
        for key, value in local.items():
            if np.ndim(value) == 0:
                assert exported[tensor_name][key] == float(value)
            else:
                np.testing.assert_array_equal(from_json(exported[tensor_name][key]), value)


def test_scalar_tensors_push_like_any_other(client):
    sid = create(client, {"name": "sgd", "lr": 0.5}, {"s": np.float32(2.0).reshape(())})["id"]
    result = push(client, sid, {"s": np.float32(1.0).reshape(())})
    assert result["params"]["s"] == {"shape": [], "data": [1.5]}


def test_lr_schedule_and_clipping_through_the_api(client):
    schedule = {"type": "step", "step_size": 2, "gamma": 0.5}
    sid = create(
        client, {"name": "sgd", "lr": 1.0}, {"w": W0}, lr_schedule=schedule, clip_grad_norm=0.1
    )["id"]
    assert client.get(f"/v1/sessions/{sid}").json()["lr_schedule"] == schedule
    lrs, next_lrs = [], []
    for _ in range(5):
        lrs.append(client.get(f"/v1/sessions/{sid}").json()["lr"])
        result = push(client, sid, {"w": np.ones((2, 3), np.float32)})
        assert result["total_norm"] == pytest.approx(np.sqrt(6), rel=1e-6)
        next_lrs.append(result["lr"])
    assert lrs == [1.0, 1.0, 0.5, 0.5, 0.25]
    assert next_lrs == [1.0, 0.5, 0.5, 0.25, 0.25]


def test_patch_lr_takes_effect_on_the_next_push(client):
    sid = create(client, {"name": "sgd", "lr": 0.1}, {"w": np.zeros(2, np.float32)})["id"]
    push(client, sid, {"w": np.ones(2, np.float32)})
    client.patch(f"/v1/sessions/{sid}", json={"optimizer": {"lr": 1.0}})
    result = push(client, sid, {"w": np.ones(2, np.float32)})
    expected = np.float32(0) - np.float32(0.1) - np.float32(1.0)
    np.testing.assert_array_equal(from_json(result["params"]["w"]), [expected, expected])


def test_nonfinite_skip_is_a_200_that_applies_nothing(client):
    sid = adam_session(client, nonfinite="skip")
    before = state(client, sid)
    bad = np.ones((2, 3), np.float32)
    bad[0, 1] = np.nan
    response = client.post(
        f"/v1/sessions/{sid}/gradients",
        content=st_body({"w": bad}),
        headers={"content-type": ST},
    )
    assert response.status_code == 200
    body = response.json()
    assert body["applied"] is False and body["skipped"] == "non_finite" and body["version"] == 0
    assert state(client, sid) == before


# -- params and state ------------------------------------------------------------------------------


def test_params_names_etag_and_put_with_if_match(client):
    sid = adam_session(client)
    response = client.get(f"/v1/sessions/{sid}/params", params={"names": "b"})
    assert response.headers["etag"] == '"0"'
    assert set(response.json()["params"]) == {"b"}
    new_w = np.full((2, 3), 9, np.float32)
    put = client.put(
        f"/v1/sessions/{sid}/params",
        json={"params": {"w": tensor(new_w)}},
        headers={"if-match": '"0"'},
    )
    assert put.status_code == 200 and put.json() == {"version": 1}
    params = client.get(f"/v1/sessions/{sid}/params").json()["params"]
    np.testing.assert_array_equal(from_json(params["w"]), new_w)
    np.testing.assert_array_equal(from_json(params["b"]), B0)
    put_st = client.put(
        f"/v1/sessions/{sid}/params", content=st_body({"b": B0 * 2}), headers={"content-type": ST}
    )
    assert put_st.json() == {"version": 2}


def test_safetensors_params_are_written_in_place_and_read_like_any_file(client):
    """GET params and a push's params come back as one body the params were copied into
    (wire.SafetensorsOut: the header sits in padded room ahead of the data); the package reads
    it, and it holds what JSON says, for all tensors and a subset, on both engines."""
    sid = create(client, {"name": "adam", "lr": 0.01}, {"w": W0, "b": B0})["id"]
    push(client, sid, {"w": np.ones_like(W0), "b": np.ones_like(B0)})
    for query in ("", "?names=b", "?names=b,w"):
        as_json = client.get(f"/v1/sessions/{sid}/params{query}").json()
        raw = client.get(f"/v1/sessions/{sid}/params{query}", headers={"accept": ST}).content
        header_len = int.from_bytes(raw[:8], "little")
        assert raw[8 : 8 + header_len].endswith(b" ") and (8 + header_len) % 8 == 0
        tensors, fields = st_parse(raw)
        assert fields == {"version": 1} and sorted(tensors) == sorted(as_json["params"])
        for name, spec in as_json["params"].items():
            assert tensors[name].tobytes() == from_json(spec).tobytes()
    pushed = client.post(
        f"/v1/sessions/{sid}/gradients?return=pushed",
        content=st_body({"b": np.ones_like(B0)}),
        headers={"content-type": ST, "accept": ST},
    )
    tensors, fields = st_parse(pushed.content)
    assert sorted(tensors) == ["b"] and fields["version"] == 2 and fields["applied"] is True


def test_long_poll_returns_when_a_push_lands(client, engine_api_url):
    sid = adam_session(client)

    def push_later():
        time.sleep(0.5)
        with httpx.Client(base_url=engine_api_url) as other:
            push(other, sid, {"w": np.ones((2, 3), np.float32)})

    thread = threading.Thread(target=push_later)
    thread.start()
    started = time.monotonic()
    response = client.get(f"/v1/sessions/{sid}/params", params={"after_version": 0, "wait_s": 20})
    elapsed = time.monotonic() - started
    thread.join()
    assert response.json()["version"] == 1
    assert elapsed < 15  # it returned on the push, not at the end of wait_s
    timed_out = client.get(f"/v1/sessions/{sid}/params", params={"after_version": 1, "wait_s": 0.3})
    assert timed_out.status_code == 304 and timed_out.headers["etag"] == '"1"'
    assert timed_out.content == b""


@pytest.mark.parametrize("accept", ["application/json", ST])
def test_state_export_import_continues_identically(client, accept):
    grads = [{"w": np.full((2, 3), g, np.float32), "b": np.full(3, -g, np.float32)} for g in (1, 2)]
    source = adam_session(client)
    for g in grads:
        push(client, source, g)
    exported = client.get(f"/v1/sessions/{source}/state", headers={"accept": accept})
    target = adam_session(client)
    imported = client.put(
        f"/v1/sessions/{target}/state",
        content=exported.content,
        headers={"content-type": exported.headers["content-type"]},
    )
    assert imported.status_code == 200, imported.text
    a = push(client, source, grads[0])
    b = push(client, target, grads[0])
    assert a["params"] == b["params"]
    if accept == "application/json":
        doc = exported.json()
        assert set(doc["tensors"]["w"]) == {"param", "step", "exp_avg", "exp_avg_sq"}
        assert doc["tensors"]["w"]["step"] == 2.0


def test_state_import_is_validated_and_changes_nothing(client):
    sid = adam_session(client)
    push(client, sid, {"w": np.ones((2, 3), np.float32)})
    before = state(client, sid)
    doc = client.get(f"/v1/sessions/{sid}/state").json()
    del doc["tensors"]["w"]["exp_avg"]
    assert_problem(client.put(f"/v1/sessions/{sid}/state", json=doc), 422, "invalid_state")
    doc = client.get(f"/v1/sessions/{sid}/state").json()
    doc["tensors"]["w"]["exp_avg"] = tensor(np.zeros(4, np.float32))
    assert_problem(client.put(f"/v1/sessions/{sid}/state", json=doc), 422, "shape_mismatch")
    doc = client.get(f"/v1/sessions/{sid}/state").json()
    doc["optimizer"] = {"name": "sgd"}
    assert_problem(client.put(f"/v1/sessions/{sid}/state", json=doc), 422, "invalid_state")
    doc = client.get(f"/v1/sessions/{sid}/state").json()
    doc["lr_schedule"] = {"type": "exponential", "gamma": 0.5}
    assert_problem(client.put(f"/v1/sessions/{sid}/state", json=doc), 422, "invalid_state")
    assert state(client, sid) == before


def test_state_import_with_a_new_lr_sets_the_lr_used_next(client):
    sid = adam_session(client)  # lr 0.01
    doc = client.get(f"/v1/sessions/{sid}/state").json()
    doc["optimizer"]["lr"] = 0.5
    del doc["lr_schedule_state"]  # like torch's load_state_dict: the group's lr is what counts
    assert client.put(f"/v1/sessions/{sid}/state", json=doc).status_code == 200
    session = client.get(f"/v1/sessions/{sid}").json()
    assert session["optimizer"]["lr"] == session["lr"] == 0.5


def test_one_million_parameters_round_trip_through_safetensors(client):
    big = np.random.default_rng(1).standard_normal(1_000_000).astype(np.float32)
    body = st_body({"big": big}, optimizer={"name": "sgd", "lr": 0.5})
    sid = client.post("/v1/sessions", content=body, headers={"content-type": ST}).json()["id"]
    tensors, _ = st_parse(client.get(f"/v1/sessions/{sid}/params", headers={"accept": ST}).content)
    np.testing.assert_array_equal(tensors["big"], big)
    grad = np.random.default_rng(2).standard_normal(1_000_000).astype(np.float32)
    response = client.post(
        f"/v1/sessions/{sid}/gradients",
        content=st_body({"big": grad}),
        headers={"content-type": ST, "accept": ST},
    )
    tensors, fields = st_parse(response.content)
    assert fields["version"] == 1
    expected = (big.astype(np.float64) - 0.5 * grad.astype(np.float64)).astype(np.float32)
    np.testing.assert_array_equal(tensors["big"], expected)  # fma(g, -lr, p), one rounding


def test_openapi_and_health(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json() == {"status": "ready"}
    spec = client.get("/openapi.json").json()
    assert "/v1/sessions/{sid}/gradients" in spec["paths"]
    push_body = spec["paths"]["/v1/sessions/{sid}/gradients"]["post"]["requestBody"]["content"]
    assert set(push_body) == {"application/json", ST}
    assert client.get("/docs").status_code == 200
