"""Graceful shutdown: SIGTERM while worker processes push stops the server taking connections,
lets the pushes in flight finish and commit, answers a pending long-poll at once, and exits 0;
every acknowledged push is in the state a restarted server reads back, and nothing else is.

SGD with multiples of 1/8 and lr 1/2 (tests/test_concurrency.py): the params after any set of
pushes are p0 - lr * (sum of their gradients), exactly, in any order.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from optserve.engine.pushes import PushRequest
from optserve.engine.sessions import SessionService
from optserve.store.errors import StoreUnavailable
from optserve.store.redis_store import RedisStore

from .api_helpers import create, from_json
from .test_concurrency import P0, SHAPES, WORKER_SCRIPT, assert_response_params, grads_of

WORKERS, PUSHES, LR = 4, 400, 0.5
#: SIGTERM once the session has taken this many steps: well inside the traffic
STEPS_BEFORE_SIGTERM = 40
#: The server's graceful-shutdown bound: a long-poll it did not release would hold it this long.
SHUTDOWN_TIMEOUT_S = 20


def start_workers(url: str, sid: str, tmp_path: Path) -> list[tuple[subprocess.Popen, Path]]:
    """Worker processes (tests/workers/push_worker.py), connected and waiting at the barrier."""
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    procs = []
    for worker in range(WORKERS):
        out = tmp_path / f"worker-{worker}.json"
        command = [
            sys.executable, str(WORKER_SCRIPT), "--servers", url, f"--session={sid}",
            "--worker", str(worker), "--pushes", str(PUSHES), "--tensors", json.dumps(SHAPES),
            "--barrier", str(barrier), "--out", str(out),
            "--wire", "json" if worker % 2 == 0 else "safetensors",
        ]  # fmt: skip
        log = open(tmp_path / f"worker-{worker}.log", "wb")  # noqa: SIM115 - the child writes it
        procs.append((subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT), out))
        log.close()
    deadline = time.monotonic() + 60
    while len(list(barrier.glob("ready-*"))) < WORKERS:
        assert all(proc.poll() is None for proc, _ in procs), "a worker exited before the start"
        assert time.monotonic() < deadline, "workers did not get ready within 60 s"
        time.sleep(0.01)
    return procs


def wait_for_version(client: httpx.Client, sid: str, version: int) -> None:
    deadline = time.monotonic() + 60
    while client.get(f"/v1/sessions/{sid}").json()["version"] < version:
        assert time.monotonic() < deadline, f"the session did not reach version {version}"
        time.sleep(0.005)


def test_sigterm_during_pushes_loses_no_acknowledged_push(server_factory, engine_env, tmp_path):
    """Both engines: the hot engine's owner hands its sessions back on the way out, and the
    restarted server takes them over from snapshot + log."""
    server = server_factory(**engine_env, OPTSERVE_SHUTDOWN_TIMEOUT_S=str(SHUTDOWN_TIMEOUT_S))
    assert server.process is not None
    with httpx.Client(base_url=server.url, timeout=30) as client:
        sid = create(client, {"name": "sgd", "lr": LR}, P0)["id"]
        procs = start_workers(server.url, sid, tmp_path)
        long_poll: dict[str, int] = {}

        def poll() -> None:  # a version that never comes: it would wait the full 60 s
            query = {"after_version": 10**9, "wait_s": 60}
            response = httpx.get(f"{server.url}/v1/sessions/{sid}/params", params=query, timeout=90)
            long_poll["status"] = response.status_code

        poller = threading.Thread(target=poll)
        poller.start()
        try:
            (tmp_path / "barrier" / "go").touch()
            wait_for_version(client, sid, STEPS_BEFORE_SIGTERM)
            sigterm_at = time.time()
            server.process.send_signal(signal.SIGTERM)
            # exits well before the shutdown timeout: the long-poll did not hold it
            assert server.process.wait(timeout=SHUTDOWN_TIMEOUT_S - 5) == 0
            poller.join(timeout=10)
            assert long_poll.get("status") == 304
        finally:
            for proc, _ in procs:
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
    records = []
    for proc, out in procs:
        assert proc.returncode == 0
        records += json.loads(out.read_text())["pushes"]

    acked = sorted((r for r in records if r["status"] == 200), key=lambda r: r["version"])
    unanswered = [r for r in records if r["status"] != 200]
    assert acked and unanswered, "SIGTERM came before or after the traffic, not during it"
    assert all(r["status"] is None for r in unanswered), "a push was refused, not unanswered"
    in_flight = [r for r in acked if r["sent"] < sigterm_at < r["answered"]]
    assert in_flight, "no push was in flight at the SIGTERM"
    assert [r["version"] for r in acked] == list(range(1, len(acked) + 1))

    # a new server on the same store: every acknowledged step is there, and only those
    restarted = server_factory(**engine_env)
    with httpx.Client(base_url=restarted.url, timeout=30) as client:
        response = client.get(f"/v1/sessions/{sid}/params")
    assert response.status_code == 200, response.text
    assert response.json()["version"] == len(acked)
    final = {name: from_json(spec) for name, spec in response.json()["params"].items()}
    expected = {name: P0[name].astype(np.float64) for name in SHAPES}
    for record in acked:
        for name, grad in grads_of(record).items():
            expected[name] -= LR * grad
        assert_response_params(record, expected)
    for name in SHAPES:
        np.testing.assert_array_equal(final[name], expected[name].astype(np.float32))


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.mark.anyio
async def test_closing_the_service_commits_the_pushes_it_has_queued(redis_url):
    """The lifespan shutdown closes the service after the last request: pushes still queued
    for the applier (their requests cancelled at the shutdown timeout) are applied and
    committed, not cancelled; a push after that is a 503 for the client to retry elsewhere."""
    store = RedisStore.from_url(redis_url)
    service = SessionService(store)
    try:
        sid = (await service.create({"optimizer": {"name": "sgd", "lr": LR}}, P0))["id"]
        one = {"b": np.full(8, 0.125, np.float32)}
        await service.push(sid, PushRequest(grads=one))  # the session's mode is known now
        queued = [
            asyncio.create_task(service.push(sid, PushRequest(grads=one, returning="none")))
            for _ in range(20)
        ]
        await asyncio.sleep(0)  # each push is queued at the applier, none answered yet
        assert not any(task.done() for task in queued)
        await service.close()
        results = await asyncio.wait_for(asyncio.gather(*queued, return_exceptions=True), 30)
        assert [getattr(r, "version", r) for r in results] == list(range(2, 22))
        assert await store.version(sid) == 21
        with pytest.raises(StoreUnavailable):
            await service.push(sid, PushRequest(grads=one))
    finally:
        await store.close()
