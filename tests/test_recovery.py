"""Hard kills with the embedded store: state, version and optimizer moments survive a restart,
with both engines (the hot engine's restarted server takes the session over from snapshot + log
once the killed process's lease lapses)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import redis

from optserve.optim import get_algorithm
from optserve.optim.update import apply_update, initial_states
from optserve.store.embedded import PID_FILE

from .api_helpers import create, from_json, push, state
from .conftest import ENGINES, HOT_ENV, free_port

REPO = Path(__file__).resolve().parent.parent
W0 = np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4)


def grad(step: int) -> np.ndarray:
    return np.random.default_rng(step).standard_normal((3, 4)).astype(np.float32)


def reference_after(steps: int) -> np.ndarray:
    algorithm = get_algorithm("adam")
    hp = algorithm.configure({"lr": 0.01})
    params = {"w": W0.copy()}
    states = initial_states(algorithm, hp, params)
    for step in range(steps):
        apply_update(algorithm, hp, params, {"w": grad(step)}, states, hp["lr"])
    return params["w"]


def valkey_pid(data_dir: Path) -> int:
    return int((data_dir / PID_FILE).read_text().strip())


def waitaof_calls(data_dir: Path) -> int:
    """How many WAITAOF the embedded store of `data_dir` has run since it started."""
    port = re.search(r"^port (\d+)$", (data_dir / "valkey.conf").read_text(), re.M)
    with redis.Redis(port=int(port.group(1))) as client:
        stats = client.info("commandstats").get("cmdstat_waitaof")
    return stats["calls"] if stats else 0


def engine_env(engine: str, data_dir: Path, **extra: str) -> dict[str, str | None]:
    """An embedded store on `data_dir`, the engine's settings."""
    env = {"OPTSERVE_DATA_DIR": str(data_dir), "OPTSERVE_REDIS_URL": None, **extra}
    return env | HOT_ENV if engine == "hot" else env


@pytest.mark.parametrize("engine", ENGINES)
def test_sigkill_of_server_then_of_server_and_store(server_factory, tmp_path, engine: str):
    data_dir = tmp_path / "data"
    env = engine_env(engine, data_dir)
    server = server_factory(**env)
    with httpx.Client(base_url=server.url, timeout=30) as client:
        sid = create(client, {"name": "adam", "lr": 0.01}, {"w": W0})["id"]
        for step in range(3):
            push(client, sid, {"w": grad(step)})
        before = state(client, sid)
    store_pid = valkey_pid(data_dir)

    server.kill()  # the server alone: its Valkey lives on as an orphan
    server = server_factory(**env)
    with httpx.Client(base_url=server.url, timeout=30) as client:
        assert valkey_pid(data_dir) == store_pid  # adopted, not a second store on the same files
        assert state(client, sid) == before
        result = push(client, sid, {"w": grad(3)})
        assert result["version"] == 4
        np.testing.assert_array_equal(from_json(result["params"]["w"]), reference_after(4))
        before = state(client, sid)

    time.sleep(1.5)  # appendfsync everysec: the last acknowledged writes reach the disk
    server.kill()
    os.kill(valkey_pid(data_dir), signal.SIGKILL)
    server = server_factory(**env)
    with httpx.Client(base_url=server.url, timeout=30) as client:
        assert valkey_pid(data_dir) != store_pid
        assert state(client, sid) == before  # recovered from the AOF
        result = push(client, sid, {"w": grad(4)})
        assert result["version"] == 5
        np.testing.assert_array_equal(from_json(result["params"]["w"]), reference_after(5))
    server.stop()  # graceful: stops its store too
    assert not (data_dir / PID_FILE).exists()


@pytest.mark.parametrize("engine", ENGINES)
def test_fsync_always_acknowledges_after_the_aof_fsync(server_factory, tmp_path, engine: str):
    """OPTSERVE_FSYNC=always: the embedded store fsyncs every write and each commit (the hot
    engine: each log append) waits for it (WAITAOF), so even an immediate SIGKILL of both
    processes loses no acknowledged update. A local store with `appendfsync always` fsyncs
    before it replies anyway, so the kill alone cannot tell a missing WAITAOF (which a store
    run with everysec needs): the store's count of WAITAOF calls shows each push waited."""
    data_dir = tmp_path / "data"
    env = engine_env(engine, data_dir, OPTSERVE_FSYNC="always")
    server = server_factory(**env)
    with httpx.Client(base_url=server.url, timeout=30) as client:
        sid = create(client, {"name": "adam", "lr": 0.01}, {"w": W0})["id"]
        for step in range(3):
            waited = waitaof_calls(data_dir)
            assert push(client, sid, {"w": grad(step)})["version"] == step + 1
            assert waitaof_calls(data_dir) > waited, f"push {step + 1} was not fsynced"
        before = state(client, sid)
    server.kill()
    os.kill(valkey_pid(data_dir), signal.SIGKILL)  # no grace period for an everysec fsync
    conf = (data_dir / "valkey.conf").read_text()
    assert "appendfsync always" in conf
    server = server_factory(**env)
    with httpx.Client(base_url=server.url, timeout=30) as client:
        assert state(client, sid) == before


def test_make_run_serves_and_answers_readyz(tmp_path):
    port = free_port()
    env = {**os.environ, "OPTSERVE_DATA_DIR": str(tmp_path / "data")}
    env.pop("OPTSERVE_REDIS_URL", None)
    process = subprocess.Popen(
        ["make", "--no-print-directory", "run", f"PORT={port}"],
        cwd=REPO,
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        ready = None
        while time.monotonic() < deadline and process.poll() is None:
            try:
                ready = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1)
                if ready.status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        assert ready is not None and ready.json() == {"status": "ready"}
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)
    assert not (tmp_path / "data" / PID_FILE).exists()  # SIGTERM stopped the embedded store too
