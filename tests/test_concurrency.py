"""Many workers, one optimizer state: 8 worker processes push at once through two optserve
processes that share one Valkey, and nothing is lost, doubled or mixed up.

The numbers are chosen so that the order of the pushes cannot matter: gradients are multiples of
1/8 in [-2, 2], params multiples of 1/8, lr a power of two, so every float32 sum below is exact.
The versions the workers got back also give the order the server applied the pushes in, so each
acknowledged response's params are checked against the state after exactly the pushes up to its
version.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from optserve.optim import get_algorithm
from optserve.optim.update import apply_update, initial_states

from .api_helpers import create, from_json

WORKER_SCRIPT = Path(__file__).parent / "workers" / "push_worker.py"
WORKERS, PUSHES = 8, 50
SHAPES = {"w": [4, 8], "b": [8]}
P0 = {
    "w": (np.arange(32, dtype=np.float32).reshape(4, 8) - 16) / 8,
    "b": (np.arange(8, dtype=np.float32) - 3) / 4,
}


@pytest.fixture
def two_servers(two_replicas):
    """Two `optserve serve` processes on the test session's one Valkey, of either engine."""
    return two_replicas


def run_workers(
    urls: list[str],
    sid: str,
    tmp_path: Path,
    workers: int = WORKERS,
    pushes: int = PUSHES,
    *,
    extra: Sequence[str] = (),
    during: Callable[[], None] | None = None,
) -> list[dict[str, Any]]:
    """Start `workers` processes (with `extra` arguments), release them together, run `during`
    while they push, return every push they made."""
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    procs: list[tuple[subprocess.Popen, Path, Path]] = []
    try:
        for worker in range(workers):
            out, log = tmp_path / f"worker-{worker}.json", tmp_path / f"worker-{worker}.log"
            command = [
                sys.executable, str(WORKER_SCRIPT), "--servers", *urls, f"--session={sid}",
                "--worker", str(worker), "--pushes", str(pushes), "--tensors", json.dumps(SHAPES),
                "--barrier", str(barrier), "--out", str(out),
                "--wire", "json" if worker % 2 == 0 else "safetensors", *extra,
            ]  # fmt: skip
            with open(log, "wb") as log_file:
                proc = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT)
            procs.append((proc, out, log))
        deadline = time.monotonic() + 60
        while len(list(barrier.glob("ready-*"))) < workers:
            dead = [log.read_text() for proc, _, log in procs if proc.poll() is not None]
            assert not dead, f"a worker exited before the start:\n{dead[0][-3000:]}"
            assert time.monotonic() < deadline, "workers did not get ready within 60 s"
            time.sleep(0.01)
        (barrier / "go").touch()  # every worker is connected and waiting: all start together
        if during is not None:
            during()
        for proc, _, _ in procs:
            proc.wait(timeout=120)
    finally:
        for proc, _, _ in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    records = []
    for worker, (proc, out, log) in enumerate(procs):
        assert proc.returncode == 0, f"worker {worker} failed:\n{log.read_text()[-3000:]}"
        made = json.loads(out.read_text())["pushes"]
        assert len(made) == pushes
        records += [{**push, "worker": worker} for push in made]
    return records


def acknowledged_in_order(
    client: httpx.Client, sid: str, records: list[dict], expected: int = WORKERS * PUSHES
) -> list[dict]:
    """The acknowledged pushes sorted by the version each produced, after checking that every
    push was acknowledged, that no two got the same version and that the session counts them."""
    refused = [r for r in records if r["status"] != 200]
    assert not refused, f"{len(refused)} of {len(records)} pushes refused, e.g. {refused[:3]}"
    acked = [r for r in records if r["status"] == 200]
    versions = [r["version"] for r in acked]
    assert len(set(versions)) == len(versions), "two pushes got the same version"
    assert sorted(versions) == list(range(1, len(acked) + 1))
    session = client.get(f"/v1/sessions/{sid}").json()
    assert session["version"] == len(acked) == expected
    assert {r["server"] for r in acked} == {0, 1}, "both servers took pushes"
    return sorted(acked, key=lambda r: r["version"])


def grads_of(record: dict) -> dict[str, np.ndarray]:
    return {
        name: np.asarray(data, np.float32).reshape(SHAPES[name])
        for name, data in record["grads"].items()
    }


def assert_response_params(record: dict, expected: dict[str, np.ndarray]) -> None:
    for name, array in expected.items():
        got = np.asarray(record["params"][name], np.float32).reshape(SHAPES[name])
        np.testing.assert_array_equal(
            got, array, err_msg=f"params returned with version {record['version']}, {name}"
        )


def test_sgd_many_workers_two_servers_one_store(two_servers, tmp_path):
    lr = 0.5
    urls = [server.url for server in two_servers]
    with httpx.Client(base_url=urls[0], timeout=30) as client:
        sid = create(client, {"name": "sgd", "lr": lr}, P0)["id"]
        records = run_workers(urls, sid, tmp_path)
        ordered = acknowledged_in_order(client, sid, records)
        response = client.get(f"/v1/sessions/{sid}/params")
        assert response.status_code == 200, response.text
        final = {name: from_json(spec) for name, spec in response.json()["params"].items()}

    # p0 - lr * sum(g): exact in float64 and in float32 alike for these numbers.
    expected = {name: P0[name].astype(np.float64) for name in SHAPES}
    for record in ordered:
        for name, grad in grads_of(record).items():
            expected[name] -= lr * grad
        assert_response_params(record, expected)
    for name in SHAPES:
        np.testing.assert_array_equal(final[name], expected[name].astype(np.float32))


def test_adagrad_many_workers_two_servers_one_store(two_servers, tmp_path):
    options = {"name": "adagrad", "lr": 0.25, "initial_accumulator_value": 0.0}
    urls = [server.url for server in two_servers]
    with httpx.Client(base_url=urls[1], timeout=30) as client:
        sid = create(client, options, P0)["id"]
        records = run_workers(urls, sid, tmp_path)
        ordered = acknowledged_in_order(client, sid, records)
        response = client.get(f"/v1/sessions/{sid}/state")
        assert response.status_code == 200, response.text
        exported = response.json()
    assert exported["version"] == len(ordered)

    # The accumulator is the exact sum of squares; each tensor's step counts the pushes with it.
    square_sums = {name: np.zeros(shape, np.float64) for name, shape in SHAPES.items()}
    steps = dict.fromkeys(SHAPES, 0)
    for record in ordered:
        for name, grad in grads_of(record).items():
            square_sums[name] += grad.astype(np.float64) ** 2
            steps[name] += 1
    for name in SHAPES:
        entry = exported["tensors"][name]
        np.testing.assert_array_equal(from_json(entry["sum"]), square_sums[name].astype(np.float32))
        assert entry["step"] == steps[name]

    # The params are not order-free, but the versions give the order: replaying the pushes in
    # version order with the optimizer core gives every returned params and the final ones.
    algorithm = get_algorithm("adagrad")
    hp = algorithm.configure({k: v for k, v in options.items() if k != "name"})
    params = {name: P0[name].copy() for name in SHAPES}
    states = initial_states(algorithm, hp, params)
    for record in ordered:
        apply_update(algorithm, hp, params, grads_of(record), states, hp["lr"])
        assert_response_params(record, params)
    for name in SHAPES:
        np.testing.assert_array_equal(from_json(exported["tensors"][name]["param"]), params[name])
