"""/metrics after known traffic: scraped over HTTP, parsed with prometheus_client's own parser,
and every counter equal to what the traffic did (a fresh server, so nothing else counted)."""

from __future__ import annotations

import json
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from optserve.store import keys

from .api_helpers import ST, create, st_body, tensor

P0 = {"w": np.arange(4, dtype=np.float32) / 8, "b": np.zeros(2, np.float32)}
JSON_PUSHES, ST_PUSHES = 24, 16
#: the refused pushes sent, by the code each must be counted under
REFUSED = {
    "non_finite": 3,
    "unknown_tensor": 2,
    "shape_mismatch": 1,
    "session_not_found": 1,
    "invalid_body": 1,
    "unsupported_media_type": 1,
    "invalid_request": 1,
    "internal_error": 1,
}


def scrape(url: str) -> dict[tuple[str, frozenset], float]:
    """Every sample of /metrics: (sample name, labels) -> value."""
    response = httpx.get(f"{url}/metrics", timeout=10)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: dict, name: str, **labels: str) -> float:
    """A sample's value; 0 if it was never recorded (the child does not exist yet)."""
    return samples.get((name, frozenset(labels.items())), 0.0)


def labelled(samples: dict, name: str, label: str) -> dict[str, float]:
    """{label value: sample value} of every series of `name`."""
    return {dict(lbls)[label]: v for (n, lbls), v in samples.items() if n == name}


JSON = {"content-type": "application/json"}


def json_push(grads: dict[str, np.ndarray], **fields) -> dict:
    body = {"grads": {k: tensor(v) for k, v in grads.items()}, **fields}
    return {"content": json.dumps(body), "headers": JSON}


def grads_of(k: int) -> dict[str, np.ndarray]:
    """Push k's gradient: multiples of 1/8, so SGD's sums are exact in any order."""
    return {"w": np.full(4, (k % 5 - 2) / 8, np.float32), "b": np.full(2, 0.125, np.float32)}


@pytest.fixture
def server(server_factory, redis_url):
    """A fresh server (counters at zero) on the emptied test Valkey."""
    return server_factory(OPTSERVE_REDIS_URL=redis_url)


def test_metrics_match_the_traffic(server, redis_url):
    url = server.url
    local = threading.local()

    def client() -> httpx.Client:
        if not hasattr(local, "client"):
            local.client = httpx.Client(base_url=url, timeout=60)
        return local.client

    with httpx.Client(base_url=url, timeout=60) as main:
        sid = create(main, {"name": "sgd", "lr": 0.5}, P0)["id"]
        sync_sid = create(
            main, {"name": "sgd", "lr": 0.5}, P0, mode={"type": "sync", "workers": 2}
        )["id"]
        gone = create(main, {"name": "sgd", "lr": 0.5}, P0)["id"]
        assert main.delete(f"/v1/sessions/{gone}").status_code == 204
        grads_url = f"/v1/sessions/{sid}/gradients"

        # 40 acknowledged async pushes at once from 8 threads (the applier batches them)
        def one(k: int) -> int:
            grads = grads_of(k)
            if k < JSON_PUSHES:
                request = json_push(grads)
            else:
                request = {"content": st_body(grads), "headers": {"content-type": ST}}
            return client().post(grads_url, **request).status_code

        with ThreadPoolExecutor(8) as pool:
            statuses = list(pool.map(one, range(JSON_PUSHES + ST_PUSHES)))
        assert statuses == [200] * (JSON_PUSHES + ST_PUSHES)

        # one push sent twice with an Idempotency-Key: two 200s, one step
        keyed = {**json_push(grads_of(0)), "headers": {"idempotency-key": "k-1"}}
        first, again = (main.post(grads_url, **keyed) for _ in range(2))
        assert (first.status_code, again.status_code) == (200, 200)
        assert again.headers["idempotency-replayed"] == "true"

        # the refused pushes, one code at a time
        nan, st = {"w": np.array([np.nan, 0, 0, 0], np.float32)}, {"content-type": ST}
        refused = [
            *[main.post(grads_url, content=st_body(nan), headers=st) for _ in range(3)],
            *[main.post(grads_url, **json_push({"v": np.ones(2, np.float32)})) for _ in range(2)],
            main.post(grads_url, **json_push({"w": np.ones(3, np.float32)})),
            main.post(f"/v1/sessions/{gone}/gradients", **json_push(grads_of(1))),
            main.post(grads_url, content=b'{"grads": ', headers=JSON),
            main.post(grads_url, content=b"w=1", headers={"content-type": "text/plain"}),
            main.post(f"{grads_url}?return=bogus", **json_push(grads_of(1))),
        ]
        # a session whose meta is not a hash: the store's WRONGTYPE error is a 500 of its own
        broken = "f" * 32
        with redis.Redis.from_url(redis_url) as direct:
            direct.set(keys.meta_key(broken), "not a hash")
        refused.append(main.post(f"/v1/sessions/{broken}/gradients", **json_push(grads_of(1))))
        codes = Counter(r.json()["code"] for r in refused)
        assert codes == REFUSED, [r.text for r in refused]
        # errors of other routes are not refused pushes
        assert main.get(f"/v1/sessions/{gone}").status_code == 404
        assert main.get(f"/v1/sessions/{broken}").status_code == 500

        # a sync session of 2 workers: two rounds of two pushes, one step per round
        def worker(name: str) -> list[tuple[int, int]]:
            sync_url = f"/v1/sessions/{sync_sid}/gradients"
            push = json_push(grads_of(1), worker=name)
            pushed = [client().post(sync_url, **push) for _ in (1, 2)]
            return [(r.status_code, r.json().get("round")) for r in pushed]

        with ThreadPoolExecutor(2) as pool:
            rounds = list(pool.map(worker, ["a", "b"]))
        assert rounds == [[(200, 1), (200, 2)]] * 2

        versions = {s: main.get(f"/v1/sessions/{s}").json()["version"] for s in (sid, sync_sid)}
        assert versions == {sid: JSON_PUSHES + ST_PUSHES + 1, sync_sid: 2}

    samples = scrape(url)
    latency = "optserve_push_duration_seconds_count"
    assert value(samples, latency, mode="async", codec="json") == JSON_PUSHES + 2
    assert value(samples, latency, mode="async", codec="safetensors") == ST_PUSHES
    assert value(samples, latency, mode="sync", codec="json") == 4
    assert value(samples, latency, mode="sync", codec="safetensors") == 0

    applied = labelled(samples, "optserve_updates_applied_total", "mode")
    assert applied == {"async": versions[sid], "sync": versions[sync_sid]}
    assert labelled(samples, "optserve_pushes_rejected_total", "code") == REFUSED

    # every committed step is in exactly one group commit, and every commit is counted once
    batches = value(samples, "optserve_group_commit_updates_count")
    assert value(samples, "optserve_group_commit_updates_sum") == sum(applied.values())
    assert 1 <= batches <= sum(applied.values())
    store_calls = labelled(samples, "optserve_store_duration_seconds_count", "operation")
    assert store_calls["commit"] == batches
    assert store_calls["create"] == 3 and store_calls["delete"] == 1

    assert value(samples, "optserve_sync_round_duration_seconds_count") == 2
    assert value(samples, "optserve_sync_round_duration_seconds_sum") > 0
    assert value(samples, "optserve_open_sessions") == 2  # created 3, deleted 1


def test_metrics_speak_openmetrics_when_asked(api_url):
    accept = "application/openmetrics-text; version=1.0.0"
    response = httpx.get(f"{api_url}/metrics", headers={"accept": accept}, timeout=10)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/openmetrics-text")
    assert response.text.endswith("# EOF\n")
    assert "optserve_open_sessions" in response.text
