"""Sync mode over real HTTP: rounds of N pushes, one step on the mean gradient, a barrier."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import torch

from .api_helpers import assert_problem, create, from_json, tensor

SHAPES = {"w": (3, 4), "b": (4,)}


def grads_for(worker: int, round_: int) -> dict[str, np.ndarray]:
    """Multiples of 1/8: the mean of four is exact in float32, whatever the arrival order."""
    rng = np.random.default_rng(100 * round_ + worker)
    return {n: (rng.integers(-16, 17, s) / 8).astype(np.float32) for n, s in SHAPES.items()}


def post(url: str, sid: str, grads: dict[str, np.ndarray], worker: str) -> httpx.Response:
    body = {"grads": {n: tensor(g) for n, g in grads.items()}, "worker": worker}
    with httpx.Client(base_url=url, timeout=60) as client:
        return client.post(f"/v1/sessions/{sid}/gradients", json=body)


@pytest.fixture
def two_servers(two_replicas):
    return two_replicas


def test_four_workers_five_rounds_equal_torch_on_the_mean(two_servers):
    urls = [server.url for server in two_servers]
    initial = {
        n: np.linspace(-1, 1, int(np.prod(s)), dtype=np.float32).reshape(s)
        for n, s in SHAPES.items()
    }
    with httpx.Client(base_url=urls[0]) as client:
        mode = {"type": "sync", "workers": 4, "timeout_s": 30}
        session = create(client, {"name": "adam", "lr": 0.01}, initial, mode=mode)
    assert session["mode"] == {"type": "sync", "workers": 4, "timeout_s": 30.0, "min_workers": 4}
    tensors = {n: torch.nn.Parameter(torch.from_numpy(a.copy())) for n, a in initial.items()}
    reference = torch.optim.Adam(tensors.values(), lr=0.01, foreach=False)
    for round_ in range(5):
        with ThreadPoolExecutor(4) as pool:
            responses = list(
                pool.map(
                    lambda w, r=round_: post(urls[w % 2], session["id"], grads_for(w, r), f"w{w}"),
                    range(4),
                )
            )
        bodies = [r.json() for r in responses]
        assert all(r.status_code == 200 for r in responses), bodies
        assert {b["version"] for b in bodies} == {round_ + 1}  # every pusher: the same version
        assert all(b["params"] == bodies[0]["params"] for b in bodies)  # ... and the same params
        assert {b["round_workers"] for b in bodies} == {4}
        for name, param in tensors.items():
            mean = np.mean([grads_for(w, round_)[name] for w in range(4)], axis=0)
            param.grad = torch.from_numpy(mean.astype(np.float32))
        reference.step()
        for name, param in tensors.items():
            ours = from_json(bodies[0]["params"][name])
            np.testing.assert_allclose(ours, param.detach().numpy(), rtol=1e-6, atol=1e-7)


def test_a_timed_out_round_applies_with_min_workers_or_fails(engine_api_url):
    with httpx.Client(base_url=engine_api_url) as client:
        mode = {"type": "sync", "workers": 3, "timeout_s": 1.0, "min_workers": 2}
        sid = create(client, {"name": "sgd", "lr": 1.0}, {"w": np.zeros(2, np.float32)}, mode=mode)[
            "id"
        ]
    one = {"w": np.ones(2, np.float32)}
    three = {"w": np.full(2, 3, np.float32)}
    started = time.monotonic()
    with ThreadPoolExecutor(2) as pool:
        a, b = pool.map(lambda g: post(engine_api_url, sid, g[0], g[1]), [(one, "a"), (three, "b")])
    assert time.monotonic() - started >= 0.9  # it waited for the third worker until timeout_s
    assert a.status_code == b.status_code == 200
    assert a.json()["round_workers"] == 2 and a.json()["version"] == 1
    np.testing.assert_array_equal(from_json(a.json()["params"]["w"]), [-2, -2])  # mean of 1, 3

    lonely = post(engine_api_url, sid, one, "a")  # 1 push < min_workers 2: nothing is applied
    assert_problem(lonely, 504, "round_timeout")
    with httpx.Client(base_url=engine_api_url) as client:
        assert client.get(f"/v1/sessions/{sid}").json()["version"] == 1


def test_a_worker_pushing_twice_into_one_round_is_refused(engine_api_url):
    with httpx.Client(base_url=engine_api_url) as client:
        mode = {"type": "sync", "workers": 2, "timeout_s": 20}
        sid = create(client, {"name": "sgd", "lr": 1.0}, {"w": np.zeros(2, np.float32)}, mode=mode)[
            "id"
        ]
    grad = {"w": np.ones(2, np.float32)}
    with ThreadPoolExecutor(3) as pool:
        first = pool.submit(post, engine_api_url, sid, grad, "same")
        time.sleep(0.5)
        duplicate = post(engine_api_url, sid, grad, "same")
        assert_problem(duplicate, 409, "duplicate_in_round")
        other = pool.submit(post, engine_api_url, sid, grad, "other")
        assert first.result().json()["version"] == other.result().json()["version"] == 1


def test_sync_mode_is_validated(engine_api_url):
    with httpx.Client(base_url=engine_api_url) as client:
        for mode in (
            {"type": "sync"},
            {"type": "sync", "workers": 0},
            {"type": "sync", "workers": 2, "min_workers": 3},
            {"type": "sync", "workers": 2, "timeout_s": -1},
            {"type": "sync", "workers": 2, "colour": "red"},
        ):
            body = {
                "optimizer": {"name": "sgd"},
                "params": {"w": tensor(np.zeros(2))},
                "mode": mode,
            }
            assert_problem(client.post("/v1/sessions", json=body), 422, "invalid_session")


def test_a_retried_sync_push_replays_its_round(engine_api_url):
    with httpx.Client(base_url=engine_api_url, timeout=60) as client:
        mode = {"type": "sync", "workers": 1, "timeout_s": 10}
        sid = create(client, {"name": "sgd", "lr": 1.0}, {"w": np.zeros(2, np.float32)}, mode=mode)[
            "id"
        ]
        body = {"grads": {"w": tensor(np.ones(2, np.float32))}, "worker": "a"}
        headers = {"idempotency-key": "round-push-1"}
        first = client.post(f"/v1/sessions/{sid}/gradients", json=body, headers=headers)
        again = client.post(f"/v1/sessions/{sid}/gradients", json=body, headers=headers)
        assert first.json()["version"] == again.json()["version"] == 1
        assert again.headers["idempotency-replayed"] == "true"
        assert client.get(f"/v1/sessions/{sid}").json()["version"] == 1
