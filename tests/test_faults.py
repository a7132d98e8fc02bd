"""Faults, each answered without data loss, with real processes: a Valkey (AOF on) that is
SIGKILLed and restarted on the same port and files, a connection to it cut after it ran a
commit, an `optserve serve` that is SIGKILLed and restarted, and slow clients on raw sockets.

Durability: with the default `appendfsync everysec` a SIGKILLed store may lose up to about a
second of acknowledged writes (the documented trade-off). The tests that kill the store while
pushes are acknowledged therefore run with OPTSERVE_FSYNC=always (each commit waits for
`WAITAOF`), the setting under which "every acknowledged push survives" is promised.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import numpy as np
import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from optserve.optim import get_algorithm
from optserve.optim.update import apply_update, initial_states
from optserve.store import hot_log, keys, redis_store
from optserve.store.embedded import EmbeddedValkey

from .api_helpers import ST, assert_problem, create, from_json, push, st_body, st_parse, tensor
from .conftest import ENGINES, HOT_ENV, ServerProcess, free_port

WORKER_SCRIPT = Path(__file__).parent / "workers" / "retry_worker.py"
LR = 0.5
#: Multiples of 1/8 with lr 1/2: every SGD sum below is exact in float32, in any order.
SHAPES = {"w": [4, 8], "b": [8]}
P0 = {
    "w": (np.arange(32, dtype=np.float32).reshape(4, 8) - 16) / 8,
    "b": (np.arange(8, dtype=np.float32) - 3) / 4,
}


class KillableStore:
    """A Valkey with AOF on a fixed port and data dir: it can be SIGKILLed and started again at
    the same address on the same files, as a supervisor would restart it."""

    def __init__(self, data_dir: Path, appendfsync: str) -> None:
        self.valkey = EmbeddedValkey(data_dir, port=free_port(), appendfsync=appendfsync)
        self.url = f"redis://127.0.0.1:{self.valkey.requested_port}"

    def start(self) -> None:
        self.valkey.start()  # loads the AOF the killed server left

    def kill(self) -> None:
        os.kill(self.valkey.pid, signal.SIGKILL)
        self.valkey.stop()  # reaps it and frees the data dir's lock; nothing is flushed

    def client(self) -> redis.Redis:
        """A direct client that fails at once (no redis-py retries) while the store is down."""
        return redis.Redis.from_url(self.url, retry=Retry(NoBackoff(), 0), socket_timeout=5)

    def version(self, sid: str) -> int:
        with self.client() as client:
            return int(client.hget(keys.meta_key(sid), keys.VERSION_FIELD))


@pytest.fixture
def store(tmp_path: Path) -> Iterator[KillableStore]:
    killable = KillableStore(tmp_path / "store", appendfsync="always")
    killable.start()
    try:
        yield killable
    finally:
        killable.valkey.stop()


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.005)


def restart(server: ServerProcess) -> None:
    """Start a killed `optserve serve` again on its port (ServerProcess keeps it)."""
    server.start()


# -- the store stops and comes back ------------------------------------------------------------


@pytest.mark.parametrize("engine", ENGINES)
def test_store_killed_is_503_then_recovers_by_itself(
    store: KillableStore, server_factory, engine: str
):
    """A SIGKILLed store: 503 store_unavailable with Retry-After at once (not after retries or
    the 30 s command timeout), /readyz 503, nothing half-applied. Restarted on its port with its
    AOF, the same optserve process serves again, long-poll wake-ups included, with no restart.

    The hot engine's owner still holds the session in memory: while its lease is confirmed
    (LEASE_MARGIN of the lease after its last renewal: a 3 s lease here, so the reads below
    surely fall in it) it serves the params from memory, as last acknowledged. Every push is
    refused, since it cannot be logged; one that got as far as being applied in memory (a push
    without a key: no idempotency record to read first) makes the owner drop its copy, which
    may be ahead of the log, so from then on the params are 503 as with write-through."""
    hot = {**HOT_ENV, "OPTSERVE_HOT_LEASE_MS": "3000"} if engine == "hot" else {}
    server = server_factory(
        OPTSERVE_REDIS_URL=store.url, OPTSERVE_FSYNC="always", OPTSERVE_STORE_TIMEOUT_S="30", **hot
    )
    w0 = np.array([1.0, 2.0, -3.0, 0.5], np.float32)
    g = np.array([0.5, -1.0, 2.0, 0.25], np.float32)
    body = {"grads": {"w": tensor(g)}}
    with httpx.Client(base_url=server.url, timeout=60) as client:
        sid = create(client, {"name": "sgd", "lr": LR}, {"w": w0})["id"]
        assert push(client, sid, {"w": g})["version"] == 1
        params_path = f"/v1/sessions/{sid}/params"

        def params_during_the_outage() -> None:
            response = client.get(params_path)
            if engine == "write-through":
                assert_problem(response, 503, "store_unavailable")
                return
            assert response.status_code == 200, response.text  # from the owner's memory
            assert response.json()["version"] == 1
            np.testing.assert_array_equal(from_json(response.json()["params"]["w"]), w0 - LR * g)

        # A long poll waits through the outage (sent again if it meets the outage instead).
        outage_poll = LongPoll(server.url, sid, after_version=1)
        time.sleep(0.3)  # time to reach its wait
        store.kill()
        params_during_the_outage()

        started = time.monotonic()
        headers = {"Idempotency-Key": "the-push-during-the-outage"}
        response = client.post(f"/v1/sessions/{sid}/gradients", json=body, headers=headers)
        answered_in = time.monotonic() - started
        assert_problem(response, 503, "store_unavailable")
        assert int(response.headers["retry-after"]) >= 1
        # A refused connection is answered in milliseconds; redis-py's own retries with
        # backoff (its defaults in some versions) took 2-4 s here, a command timeout 30 s.
        assert answered_in < 1, f"503 only after {answered_in:.1f}s"
        params_during_the_outage()  # hot: refused before it was applied, the copy is kept
        # Without a key the hot owner applies it in memory before the append fails.
        response = client.post(f"/v1/sessions/{sid}/gradients", json=body)
        assert_problem(response, 503, "store_unavailable")
        assert_problem(client.get("/readyz"), 503, "store_unavailable")
        assert_problem(client.get(params_path), 503, "store_unavailable")  # hot: copy dropped
        assert client.get("/healthz").status_code == 200  # the process itself is fine

        store.start()
        assert client.get("/readyz").json() == {"status": "ready"}
        params = client.get(f"/v1/sessions/{sid}/params").json()
        assert params["version"] == 1  # the refused pushes left nothing behind
        np.testing.assert_array_equal(from_json(params["params"]["w"]), w0 - LR * g)

        pushed_at = time.monotonic()
        response = client.post(f"/v1/sessions/{sid}/gradients", json=body, headers=headers)
        assert response.status_code == 200, response.text
        assert response.json()["version"] == 2 and "idempotency-replayed" not in response.headers
        assert outage_poll.result(woken_after=pushed_at) == 2

        # The version events subscription is back by itself: a poll begun now is woken by the
        # next commit's event.
        with store.client() as direct:
            wait_until(lambda: direct.execute_command("PUBSUB", "NUMPAT") >= 1, "resubscribed")
        later_poll = LongPoll(server.url, sid, after_version=2)
        time.sleep(0.3)  # time to reach its wait
        pushed_at = time.monotonic()
        assert push(client, sid, {"w": g})["version"] == 3
        assert later_poll.result(woken_after=pushed_at) == 3
        final = client.get(f"/v1/sessions/{sid}/params").json()
    np.testing.assert_array_equal(from_json(final["params"]["w"]), w0 - 3 * LR * g)


class LongPoll:
    """GET params?after_version=N&wait_s=30 in a thread, sent again after a 503 or a dropped
    connection, as a client would."""

    def __init__(self, url: str, sid: str, after_version: int) -> None:
        self.url = f"{url}/v1/sessions/{sid}/params?after_version={after_version}&wait_s=30"
        self.outcome: dict[str, Any] = {}
        # daemon, and it gives up after a minute: a failed test does not hang the run at exit
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        deadline = time.monotonic() + 60
        try:
            while True:
                try:
                    response = httpx.get(self.url, timeout=60)
                except httpx.TransportError:
                    response = None
                if response is not None and response.status_code != 503:
                    break
                assert time.monotonic() < deadline, "the long poll never got an answer"
                time.sleep(0.05)
            self.outcome["answered_at"] = time.monotonic()
            self.outcome["status"] = response.status_code
            self.outcome["version"] = response.json()["version"]
        except BaseException as error:  # reported by result()
            self.outcome["error"] = error

    def result(self, woken_after: float) -> int:
        """The version it was answered with, checking that a commit at `woken_after` woke it:
        a poll whose event never came is answered only at its 30 s deadline."""
        self.thread.join(timeout=60)
        assert "error" not in self.outcome, self.outcome["error"]
        assert self.outcome["status"] == 200, self.outcome
        waited = self.outcome["answered_at"] - woken_after
        assert waited < 10, f"answered {waited:.1f}s after the commit: not woken by its event"
        return self.outcome["version"]


# -- a commit's reply lost on the way back ---------------------------------------------------------


def script_call(source: str) -> bytes:
    """How a run of a script looks on the wire (SCRIPT EXISTS, which redis-py sends first, names
    it too, without the EVALSHA)."""
    return b"$7\r\nEVALSHA\r\n$40\r\n" + hashlib.sha1(source.encode()).hexdigest().encode()


#: The write a push is acknowledged after: write-through's commit, the hot engine's log append.
COMMIT_CALLS = {
    "write-through": script_call(redis_store._COMMIT_SCRIPT),
    "hot": script_call(hot_log._script("hot_append.lua")),
}


class CommitReplyCutter:
    """A TCP proxy in front of the store. Armed, it passes the next run of `call` (the EVALSHA
    of commit.lua or hot_append.lua) on to the store and then cuts that connection before the
    reply comes back: the commit applies, and optserve cannot know it (a network fault, or a
    store that dies after it executed a command). Armed to hold (`arm(..., hold=True)`), it
    keeps the data holding `call` from the store instead, and sets `held`: the sender waits for
    a reply until it dies, and the store drops the half-sent command when the link closes."""

    def __init__(self, upstream_port: int, call: bytes = b"") -> None:
        self.upstream_port = upstream_port
        self.call = call
        self.hold = False
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.armed = threading.Event()
        self.held = threading.Event()
        self.cuts = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def arm(self, call: bytes, *, hold: bool) -> None:
        self.call, self.hold = call, hold
        self.held.clear()
        self.armed.set()

    def close(self) -> None:
        self.listener.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return  # closed
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            cut = threading.Event()
            threading.Thread(
                target=self._to_store, args=(client, upstream, cut), daemon=True
            ).start()
            threading.Thread(
                target=self._to_client, args=(upstream, client, cut), daemon=True
            ).start()

    def _to_store(self, client: socket.socket, upstream: socket.socket, cut: threading.Event):
        with contextlib.suppress(OSError):
            while data := client.recv(1 << 16):
                if self.armed.is_set() and self.call in data:
                    self.armed.clear()
                    cut.set()  # from now on nothing goes back to optserve
                    if self.hold:
                        self.held.set()
                        while client.recv(1 << 16):  # until the sender is killed
                            pass
                        break
                    upstream.sendall(data)
                    self.cuts += 1
                    _close(client)  # optserve sees the connection drop mid-command
                    time.sleep(0.2)  # while the store runs the commit
                    break
                upstream.sendall(data)
        _close(client)
        _close(upstream)

    @staticmethod
    def _to_client(upstream: socket.socket, client: socket.socket, cut: threading.Event):
        with contextlib.suppress(OSError):
            while (data := upstream.recv(1 << 16)) and not cut.is_set():
                client.sendall(data)
        _close(client)
        _close(upstream)


def _close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()


@pytest.mark.parametrize("engine", ENGINES)
def test_a_commit_whose_reply_is_lost_is_503_and_never_sent_twice(
    valkey_server, server_factory, engine: str
):
    """optserve never re-sends a store command: a commit whose reply was lost may have applied.
    Re-sending it would meet a version conflict, and the engine would re-run the batch: a push
    without an Idempotency-Key would step twice (redis-py's own retries, the default of some
    versions, did exactly that here). Instead the push is a 503; with a key, its retry replays.
    The hot engine's commit is its log append (the idempotency record goes in the same script):
    the owner, not knowing whether it landed, drops its in-memory copy, and the next request
    reloads snapshot + log, which has the push once."""
    cutter = CommitReplyCutter(valkey_server.port, COMMIT_CALLS[engine])
    hot = HOT_ENV if engine == "hot" else {}
    try:
        server = server_factory(OPTSERVE_REDIS_URL=f"redis://127.0.0.1:{cutter.port}", **hot)
        w0 = np.array([1.0, 2.0, -3.0, 0.5], np.float32)
        g = np.array([0.5, -1.0, 2.0, 0.25], np.float32)
        body = {"grads": {"w": tensor(g)}}
        with httpx.Client(base_url=server.url, timeout=60) as client:
            sid = create(client, {"name": "sgd", "lr": LR}, {"w": w0})["id"]
            path = f"/v1/sessions/{sid}/gradients"

            cutter.armed.set()
            refused = client.post(path, json=body)
            assert_problem(refused, 503, "store_unavailable")
            # A 503 without a cut is some other store error: say which (seen once under load).
            assert cutter.cuts == 1, refused.text + server.log_path.read_text()[-3000:]
            params = client.get(f"/v1/sessions/{sid}/params").json()
            assert params["version"] == 1, "the commit was sent twice"  # applied, once
            np.testing.assert_array_equal(from_json(params["params"]["w"]), w0 - LR * g)

            cutter.armed.set()
            headers = {"Idempotency-Key": "lost-reply"}
            assert_problem(client.post(path, json=body, headers=headers), 503, "store_unavailable")
            response = client.post(path, json=body, headers=headers)  # the client's retry
            assert response.status_code == 200, response.text
            assert response.headers["idempotency-replayed"] == "true"
            assert response.json()["version"] == 2
            np.testing.assert_array_equal(
                from_json(response.json()["params"]["w"]), w0 - 2 * LR * g
            )
    finally:
        cutter.close()


# -- 8 workers through a store kill and an API kill ---------------------------------------------

WORKERS, PUSHES = 8, 40


def start_workers(url: str, sid: str, tmp_path: Path) -> list[tuple[subprocess.Popen, Path, Path]]:
    """WORKERS retry_worker.py processes, released together once all are connected."""
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    procs = []
    for worker in range(WORKERS):
        out, log = tmp_path / f"worker-{worker}.json", tmp_path / f"worker-{worker}.log"
        command = [
            sys.executable, str(WORKER_SCRIPT), "--server", url, f"--session={sid}",
            "--worker", str(worker), "--pushes", str(PUSHES), "--tensors", json.dumps(SHAPES),
            "--barrier", str(barrier), "--out", str(out),
            "--codec", "json" if worker % 2 == 0 else "safetensors",
        ]  # fmt: skip
        with open(log, "wb") as log_file:
            procs.append(
                (subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT), out, log)
            )
    try:
        wait_until(lambda: len(list(barrier.glob("ready-*"))) == WORKERS, "the workers are ready")
    except AssertionError:
        stop_workers(procs)
        raise
    (barrier / "go").touch()
    return procs


def stop_workers(procs: list[tuple[subprocess.Popen, Path, Path]]) -> None:
    for proc, _, _ in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def finish_workers(procs: list[tuple[subprocess.Popen, Path, Path]]) -> list[dict]:
    try:
        for proc, _, _ in procs:
            proc.wait(timeout=120)
    finally:
        stop_workers(procs)
    records = []
    for worker, (proc, out, log) in enumerate(procs):
        assert proc.returncode == 0, f"worker {worker} failed:\n{log.read_text()[-3000:]}"
        pushes = json.loads(out.read_text())["pushes"]
        failed = [p for p in pushes if "error" in p]
        assert not failed, f"worker {worker} gave up on {len(failed)} pushes: {failed[0]['error']}"
        assert len(pushes) == PUSHES
        records += pushes
    return records


@pytest.mark.parametrize("engine", ENGINES)
def test_workers_finish_exactly_through_store_and_api_kills(
    store: KillableStore, server_factory, tmp_path: Path, engine: str
):
    """8 worker processes push through the Python client's retries while the store is SIGKILLed
    and restarted (AOF, fsync=always), then the API, then both at once. Every push is
    acknowledged once, with its own version: versions 1..N, each exactly once (a push applied
    twice would take two, a lost acknowledged one would see its version reused), and the params
    are exactly p0 - lr * (sum of every gradient), after each push as after the last. Both
    engines: the hot engine's restarted API takes its session back from snapshot + log once the
    dead incarnation's lease lapses."""
    hot = HOT_ENV if engine == "hot" else {}
    server = server_factory(OPTSERVE_REDIS_URL=store.url, OPTSERVE_FSYNC="always", **hot)
    with httpx.Client(base_url=server.url, timeout=60) as client:
        sid = create(client, {"name": "sgd", "lr": LR}, P0)["id"]
    total = WORKERS * PUSHES
    procs = start_workers(server.url, sid, tmp_path)
    killed_at = []
    try:
        wait_until(lambda: store.version(sid) >= total // 4, "a quarter is pushed")
        killed_at.append(store.version(sid))
        store.kill()
        time.sleep(0.5)  # pushes meet 503s meanwhile
        store.start()

        wait_until(lambda: store.version(sid) >= total // 2, "half is pushed")
        killed_at.append(store.version(sid))
        server.kill()
        time.sleep(0.2)  # connections refused meanwhile
        restart(server)

        wait_until(lambda: store.version(sid) >= 3 * total // 4, "three quarters are pushed")
        killed_at.append(store.version(sid))
        server.kill()
        store.kill()
        store.start()
        restart(server)
    except BaseException:
        stop_workers(procs)
        raise
    records = finish_workers(procs)
    assert all(version < total for version in killed_at), killed_at  # faults hit mid-run
    outcomes = [outcome for record in records for outcome in record["attempts"]]
    assert 503 in outcomes, "no push met the store outage"
    assert any(isinstance(o, str) for o in outcomes), "no push met a dropped connection"

    versions = sorted(record["version"] for record in records)
    assert versions == list(range(1, total + 1)), "a push applied twice, or an ack lost"
    assert store.version(sid) == total
    expected = {name: P0[name].astype(np.float64) for name in SHAPES}
    for record in sorted(records, key=lambda r: r["version"]):
        for name, data in record["grads"].items():
            expected[name] -= LR * np.asarray(data, np.float64).reshape(SHAPES[name])
        for name, data in record.get("params", {}).items():  # replays carry later params
            got = np.asarray(data, np.float32).reshape(SHAPES[name])
            np.testing.assert_array_equal(got, expected[name], err_msg=f"v{record['version']}")
    with httpx.Client(base_url=server.url, timeout=60) as client:
        final = client.get(f"/v1/sessions/{sid}/params").json()
    assert final["version"] == total
    for name in SHAPES:
        np.testing.assert_array_equal(from_json(final["params"][name]), expected[name])


# -- one big push, the API SIGKILLed at three moments of it -------------------------------------

#: Enough float32 for two 16 MiB chunks per stored array: a torn commit would mix chunks.
BIG = 2**22 + 1000
BIG_OPTIMIZER = {"name": "sgd", "lr": LR, "momentum": 0.5}


def big_expected(steps: int, p0: np.ndarray, g: np.ndarray) -> dict[str, np.ndarray]:
    """param and momentum_buffer after `steps` pushes of g, by the optimizer core."""
    algorithm = get_algorithm("sgd")
    hp = algorithm.configure({k: v for k, v in BIG_OPTIMIZER.items() if k != "name"})
    params = {"w": p0.copy()}
    states = initial_states(algorithm, hp, params)
    for _ in range(steps):
        apply_update(algorithm, hp, params, {"w": g}, states, hp["lr"])
    expected = {"w/param": params["w"]}
    if steps:  # torch makes the buffer on the first step
        expected["w/momentum_buffer"] = states["w"]["momentum_buffer"]
    return expected


def kill_when_body_is_half_sent(store, sid, server, body, path, headers) -> None:
    """Headers and half the body on a raw socket, then the kill: the push never got whole."""
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(request_head(path, len(body), headers))
        sock.sendall(body[: len(body) // 2])
        server.kill()


def kill_when_commit_is_staged(store, sid, server, body, path, headers) -> None:
    """Kill the moment the commit's first array chunk is staged in the store."""
    pattern = f"{keys.session_tag(sid)}:stage:*"
    with store.client() as direct:
        leftovers = set(direct.keys(pattern))  # staged by an earlier killed commit, if any
        sender = send_in_thread(server.url + path, body, headers)
        wait_until(lambda: bool(set(direct.keys(pattern)) - leftovers), "staged", timeout=30)
        server.kill()
    sender.join()


def kill_when_held(proxy: CommitReplyCutter, call: bytes, what: str) -> Callable[..., None]:
    """Kill the moment `what` is on its way to the store, the proxy holding it back: it never
    lands, as when the process dies before its last byte is out. (The hot engine's staged keys
    live for microseconds, its SETs and script going in one pipeline: too short to poll for.)"""

    def kill(store, sid, server, body, path, headers) -> None:
        proxy.arm(call, hold=True)
        sender = send_in_thread(server.url + path, body, headers)
        assert proxy.held.wait(30), f"no {what} was sent"
        server.kill()
        sender.join()

    kill.__name__ = f"kill_when_the_{what.replace(' ', '_')}_is_sent"
    return kill


def kill_when_version_moved(store, sid, server, body, path, headers) -> None:
    """Kill the moment the commit is in, while the answer may still be on its way."""
    before = store.version(sid)
    sender = send_in_thread(server.url + path, body, headers)
    wait_until(lambda: store.version(sid) > before, "the commit landed", timeout=30)
    server.kill()
    sender.join()


@pytest.mark.parametrize("engine", ENGINES)
def test_api_sigkill_during_one_big_push_leaves_it_before_or_after(
    store: KillableStore, server_factory, engine: str
):
    """A push of a 2-chunk tensor, its server SIGKILLed while the body arrives, while the commit
    is being staged, and just after it landed: each time the session is at version N or N+1
    with param and momentum exactly those of that version (never a mix of chunks), and the
    push's retry with its Idempotency-Key makes it N+1 exactly once.

    The hot engine (a snapshot after every log entry) is killed while the body arrives, while
    its log append is on its way to the store (applied in the owner's memory, never logged: N),
    just after the append landed, and while the snapshot written after that append is on its
    way (the push is in the log: N+1 from the older snapshot and the log). Its restarted server
    (same address) takes the session over once the killed process's lease lapses."""
    kills = [kill_when_body_is_half_sent, kill_when_commit_is_staged, kill_when_version_moved]
    url, proxy = store.url, None
    if engine == "hot":
        proxy = CommitReplyCutter(store.valkey.requested_port)
        url = f"redis://127.0.0.1:{proxy.port}"
        kills = [
            kill_when_body_is_half_sent,
            kill_when_held(proxy, b":lgstage:", "log append"),  # its first staged gradient SET
            kill_when_version_moved,
            kill_when_held(proxy, b":stage:", "snapshot"),  # its first staged array SET
        ]
    hot = {**HOT_ENV, "OPTSERVE_HOT_SNAPSHOT_STEPS": "1"} if engine == "hot" else {}
    try:
        outcomes = kill_during_big_pushes(
            store, server_factory(OPTSERVE_REDIS_URL=url, **hot), kills
        )
    finally:
        if proxy is not None:
            proxy.close()
    assert outcomes[0] == 0 and outcomes[2] == 1  # the first never arrived, the third landed
    if engine == "hot":
        assert outcomes[1] == 0 and outcomes[3] == 1  # never logged; logged before the snapshot


def kill_during_big_pushes(
    store: KillableStore, server: ServerProcess, kills: list[Callable[..., None]]
) -> list[int]:
    """Push n of a big gradient, killed by kills[n]: 0 if the restarted server is at n, 1 at
    n + 1, after checking the state is exactly that of its version, and the retry."""
    p0 = ((np.arange(BIG) % 64 - 32) / 8).astype(np.float32)
    g = ((np.arange(BIG) % 7 + 1) / 4).astype(np.float32)  # every element moves every step
    with httpx.Client(base_url=server.url, timeout=120) as client:
        response = client.post(
            "/v1/sessions",
            content=st_body({"w": p0}, optimizer=BIG_OPTIMIZER),
            headers={"content-type": ST},
        )
        assert response.status_code == 201, response.text
        sid = response.json()["id"]
    body = st_body({"w": g})
    path = f"/v1/sessions/{sid}/gradients?return=none"
    outcomes = []
    for n, kill in enumerate(kills):
        headers = {"content-type": ST, "idempotency-key": f"big-push-{n}"}
        with store.client() as direct:  # hot: no snapshot of an earlier push is still due
            log = keys.log_key(sid)
            wait_until(lambda: direct.xlen(log) == 0, "the log is in a snapshot")  # noqa: B023
        kill(store, sid, server, body, path, headers)
        restart(server)
        with httpx.Client(base_url=server.url, timeout=120) as client:
            response = client.get(f"/v1/sessions/{sid}/state", headers={"accept": ST})
            arrays, fields = st_parse(response.content)
            version = fields["version"]
            assert version in (n, n + 1), (kill.__name__, version)
            outcomes.append(version - n)
            expected = big_expected(version, p0, g)
            assert sorted(arrays) == sorted(expected), kill.__name__
            for name, array in expected.items():
                np.testing.assert_array_equal(arrays[name], array, err_msg=kill.__name__)

            response = client.post(path, content=body, headers=headers)  # the retry
            assert response.status_code == 200, response.text
            assert response.json()["version"] == n + 1
            replayed = response.headers.get("idempotency-replayed") == "true"
            assert replayed == (version == n + 1), kill.__name__
    return outcomes


def request_head(path: str, length: int, headers: dict[str, str]) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "host: 127.0.0.1", f"content-length: {length}"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def send_in_thread(url: str, body: bytes, headers: dict[str, str]) -> threading.Thread:
    """The push's first attempt; its answer, if it gets one, is not needed."""

    def send() -> None:
        with contextlib.suppress(httpx.TransportError):  # the server is killed under it
            httpx.post(url, content=body, headers=headers, timeout=120)

    thread = threading.Thread(target=send)
    thread.start()
    return thread


# -- slow clients ----------------------------------------------------------------------------------


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response with a Content-Length, read off a raw socket."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, "connection closed before the response headers"
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in header_lines)}
    length = int(headers["content-length"])
    while len(rest) < length:
        chunk = sock.recv(1 << 20)
        assert chunk, "connection closed mid-body"
        rest += chunk
    return int(status_line.split()[1]), headers, rest


def test_slow_clients_do_not_hold_the_sessions_applier(engine_api_url: str):
    """A client that sends its headers and then trickles its body, and one that never reads its
    (16 MB) answer, hold only their own requests: the body is read whole before a push joins
    the applier's queue, and the answer is written after the applier let go (with the hot
    engine: after the session's lock is released). Other workers' pushes to the same session
    are applied meanwhile, each with the next version. Both engines."""
    api_url = engine_api_url
    host, port = urlsplit(api_url).hostname, urlsplit(api_url).port
    w0 = np.array([1.0, 2.0, -3.0, 0.5], np.float32)
    g = np.array([0.5, -1.0, 2.0, 0.25], np.float32)
    with httpx.Client(base_url=api_url, timeout=10) as client:
        big = np.zeros(2**22, np.float32)
        sid = create(client, {"name": "sgd", "lr": LR}, {"w": w0, "big": big})["id"]
        path = f"/v1/sessions/{sid}/gradients"
        json_body = json.dumps({"grads": {"w": tensor(g)}}).encode()
        headers = {"content-type": "application/json"}

        # Never reads the answer: all params (16 MB) as safetensors, far past the socket buffers.
        stalled = socket.create_connection((host, port))
        stalled.sendall(
            request_head(path + "?return=all", len(json_body), {**headers, "accept": ST})
        )
        stalled.sendall(json_body)
        wait_until(lambda: client.get(f"/v1/sessions/{sid}").json()["version"] == 1, "applied")

        # Sends half its body, then stalls mid-body while the others push.
        slow = socket.create_connection((host, port))
        slow.sendall(request_head(path + "?return=pushed", len(json_body), headers))
        slow.sendall(json_body[: len(json_body) // 2])
        time.sleep(0.2)  # its half body has surely arrived
        for expected_version in range(2, 22):
            response = client.post(path + "?return=none", content=json_body, headers=headers)
            assert response.status_code == 200, response.text
            assert response.json()["version"] == expected_version

        slow.sendall(json_body[len(json_body) // 2 :])
        status, _, answer = read_response(slow)
        assert status == 200 and json.loads(answer)["version"] == 22
        status, _, answer = read_response(stalled)
        assert status == 200 and st_parse(answer)[1]["version"] == 1
        slow.close()
        stalled.close()
        final = client.get(path.replace("/gradients", "/params") + "?names=w").json()
    np.testing.assert_array_equal(from_json(final["params"]["w"]), w0 - 22 * LR * g)
