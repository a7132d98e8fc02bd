"""The embedded store against the real valkey-server binary, with real processes and real kills.

Crash cases run optserve's side in a child Python process, so that SIGKILL hits a real process
that owns the server, exactly as when `optserve serve` is killed. Every test registers what it
starts with the `procs` fixture, which ends it all afterwards, passed or failed.
"""

from __future__ import annotations

import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import suppress
from pathlib import Path

import pytest
import redis

from optserve.store.embedded import (
    DataDirLockedError,
    EmbeddedValkey,
    EmbeddedValkeyError,
    EmbeddedValkeyStartupError,
)

# An optserve that starts the store, writes a key, reports, and waits to be killed.
CRASHING_OPTSERVE = """
import sys, time
from pathlib import Path
import redis
from optserve.store.embedded import EmbeddedValkey
store = EmbeddedValkey(Path(sys.argv[1]))
with redis.Redis.from_url(store.start()) as client:
    client.set("survivor", b"written before the crash")
print(store.pid, store.port, flush=True)
time.sleep(120)
"""

# A second optserve on a data dir that is already in use: must fail, not start a store.
SECOND_OPTSERVE = """
import sys
from pathlib import Path
from optserve.store.embedded import DataDirLockedError, EmbeddedValkey
try:
    EmbeddedValkey(Path(sys.argv[1])).start()
except DataDirLockedError as error:
    print(error)
    sys.exit(3)
"""


# -- process inspection, independent of the code under test --------------------------------------


def _state(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return None


def alive(pid: int) -> bool:
    """Running, not a zombie (a killed orphan may wait for init to reap it)."""
    return _state(pid) not in (None, "Z", "X")


def valkeys_on(root: Path) -> list[int]:
    """Pids of live valkey-servers whose working directory is `root` or below it."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            cwd = Path(os.readlink(entry / "cwd"))
        except OSError:
            continue
        if b"valkey-server" in cmdline and cwd.is_relative_to(root) and alive(int(entry.name)):
            found.append(int(entry.name))
    return found


def wait_dead(pid: int, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while alive(pid):
        assert time.monotonic() < deadline, f"pid {pid} still alive"
        time.sleep(0.02)


def dir_size(root: Path) -> int:
    total = 0
    for path in root.rglob("*"):
        with suppress(FileNotFoundError):  # rewrites delete files as we walk
            if path.is_file():
                total += path.stat().st_size
    return total


class Procs:
    """Everything a test starts, ended at teardown even when the test failed."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.stores: list[EmbeddedValkey] = []
        self.children: list[subprocess.Popen[bytes]] = []

    def store(self, data_dir: Path, **kwargs: object) -> EmbeddedValkey:
        store = EmbeddedValkey(data_dir, **kwargs)  # type: ignore[arg-type]
        self.stores.append(store)
        return store

    def child(self, script: str, *args: str) -> subprocess.Popen[bytes]:
        child = subprocess.Popen(
            [sys.executable, "-c", script, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        self.children.append(child)
        return child

    def end_all(self) -> None:
        for store in self.stores:
            with suppress(Exception):
                store.stop()
        for child in self.children:
            child.kill()
            child.communicate(timeout=10)
        for pid in valkeys_on(self.root):  # orphans of killed children, or of a failed test
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Procs]:
    procs = Procs(tmp_path.resolve())
    try:
        yield procs
    finally:
        procs.end_all()


def read_line(child: subprocess.Popen[bytes], timeout: float = 20.0) -> str:
    """One line from a child's stdout, failing with its stderr instead of hanging."""
    assert child.stdout is not None and child.stderr is not None
    ready, _, _ = select.select([child.stdout], [], [], timeout)
    line = child.stdout.readline().decode().strip() if ready else ""
    if not line:
        child.kill()
        _, err = child.communicate(timeout=10)
        pytest.fail(f"child printed nothing within {timeout} s; stderr:\n{err.decode()}")
    return line


# -- lifecycle ------------------------------------------------------------------------------------


def test_start_ping_stop(procs: Procs, tmp_path: Path) -> None:
    data = tmp_path / "data"
    store = procs.store(data)
    url = store.start()

    assert url == store.url == f"redis://127.0.0.1:{store.port}"
    with redis.Redis.from_url(url) as client:
        assert client.ping()
        assert client.info("server")["process_id"] == store.pid
    assert (data / "valkey.pid").read_text().strip() == str(store.pid)
    assert not store.adopted
    assert store.start() == url  # already running: same server
    assert valkeys_on(data) == [store.pid]

    pid = store.pid
    store.stop()
    assert not alive(pid)
    assert not (data / "valkey.pid").exists()  # a graceful exit removes it
    assert not store.running
    with pytest.raises(EmbeddedValkeyError, match="not running"):
        _ = store.url
    store.stop()  # twice is fine


def test_data_survives_stop_and_start_on_the_same_dir(procs: Procs, tmp_path: Path) -> None:
    data = tmp_path / "data"
    with procs.store(data) as store, redis.Redis.from_url(store.url) as client:
        client.set("optserve:{s1}:t:w", b"\x00\x01" * 1000)
        port = store.port
    assert valkeys_on(data) == []

    with procs.store(data) as store, redis.Redis.from_url(store.url) as client:
        assert client.get("optserve:{s1}:t:w") == b"\x00\x01" * 1000
        assert store.port == port  # the recorded port, free again, is reused
        assert not store.adopted


def test_config_is_applied(procs: Procs, tmp_path: Path) -> None:
    data = tmp_path / "data"
    with (
        procs.store(data) as store,
        redis.Redis.from_url(store.url, decode_responses=True) as client,
    ):
        config = client.config_get("*")
        persistence = client.info("persistence")

    assert config["bind"] == "127.0.0.1"
    assert config["protected-mode"] == "yes"
    assert config["appendonly"] == "yes"
    assert config["appendfsync"] == "everysec"
    assert config["save"] == ""  # no RDB snapshots: the AOF is the durability
    assert config["aof-load-truncated"] == "yes"
    assert config["auto-aof-rewrite-percentage"] == "100"
    assert config["auto-aof-rewrite-min-size"] == str(64 << 20)
    assert config["maxmemory-policy"] == "noeviction"
    assert Path(config["dir"]) == data.resolve()
    assert Path(config["pidfile"]) == data.resolve() / "valkey.pid"
    assert Path(config["logfile"]) == data.resolve() / "valkey.log"
    assert persistence["aof_enabled"] == 1


def test_appendfsync_always_is_accepted(procs: Procs, tmp_path: Path) -> None:
    with (
        procs.store(tmp_path / "data", appendfsync="always") as store,
        redis.Redis.from_url(store.url, decode_responses=True) as client,
    ):
        assert client.config_get("appendfsync") == {"appendfsync": "always"}
        client.set("k", "v")
        assert client.get("k") == "v"
    with pytest.raises(ValueError, match="appendfsync"):
        EmbeddedValkey(tmp_path / "data", appendfsync="sometimes")


def test_startup_failure_reports_the_log_and_frees_the_dir(procs: Procs, tmp_path: Path) -> None:
    data = tmp_path / "data"
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        store = procs.store(data, port=squatter.getsockname()[1])
        with pytest.raises(EmbeddedValkeyStartupError, match="Address already in use"):
            store.start()
    assert valkeys_on(data) == []
    store.start()  # the failure released the lock; the port is free now
    assert valkeys_on(data) == [store.pid]


def test_aof_rewrites_keep_the_files_bounded(procs: Procs, tmp_path: Path) -> None:
    """A busy session SETs its whole multi-MB state on every step; the AOF must not grow with it."""
    data = tmp_path / "data"
    state = os.urandom(4 << 20)
    steps = 60  # 240 MB written in all, almost 4x the 64 MB rewrite threshold
    peak = 0
    with procs.store(data) as store, redis.Redis.from_url(store.url) as client:
        for _ in range(steps):
            client.set("optserve:{s1}:t:w", state)
            peak = max(peak, dir_size(data))
            # At most a fast push rate (100/s): SETs back to back on a loaded machine outran the
            # background rewrite and overshot the bound by a few MB, which no push rate does.
            time.sleep(0.01)
        rewrites = client.info("persistence")["aof_rewrites"]
    assert rewrites >= 2
    assert peak < 160 << 20, f"data dir peaked at {peak >> 20} MB"


# -- one data dir, one server ---------------------------------------------------------------------


def test_second_instance_on_the_same_dir_fails_fast(procs: Procs, tmp_path: Path) -> None:
    data = tmp_path / "data"
    first = procs.store(data)
    first.start()

    second = procs.store(data)
    with pytest.raises(DataDirLockedError, match="already in use by another optserve"):
        second.start()

    other_process = procs.child(SECOND_OPTSERVE, str(data))
    out, err = other_process.communicate(timeout=20)
    assert other_process.returncode == 3, err.decode()
    assert f"pid {os.getpid()}".encode() in out  # names the holder
    assert valkeys_on(data) == [first.pid]

    first.stop()
    second.start()  # the lock went away with the first
    assert valkeys_on(data) == [second.pid]


# -- crashes --------------------------------------------------------------------------------------


def test_sigkill_of_optserve_alone_adopts_the_orphaned_server(procs: Procs, tmp_path: Path) -> None:
    data = tmp_path / "data"
    child = procs.child(CRASHING_OPTSERVE, str(data))
    valkey_pid = int(read_line(child).split()[0])

    child.kill()
    child.wait(timeout=10)
    assert alive(valkey_pid), "the valkey child should survive its parent"

    store = procs.store(data, appendfsync="always")
    store.start()
    assert store.adopted
    assert store.pid == valkey_pid
    assert valkeys_on(data) == [valkey_pid]
    with redis.Redis.from_url(store.url, decode_responses=True) as client:
        assert client.get("survivor") == "written before the crash"
        # the adopter's settings win over the ones the survivor was started with
        assert client.config_get("appendfsync") == {"appendfsync": "always"}

    store.stop()  # also ends an adopted server
    wait_dead(valkey_pid)
    assert valkeys_on(data) == []


def test_sigkill_of_optserve_and_valkey_restarts_from_the_aof(procs: Procs, tmp_path: Path) -> None:
    data = tmp_path / "data"
    child = procs.child(CRASHING_OPTSERVE, str(data))
    pid_text, port_text = read_line(child).split()
    valkey_pid = int(pid_text)
    time.sleep(1.2)  # appendfsync everysec: let the write reach the disk

    os.kill(valkey_pid, signal.SIGKILL)
    child.kill()
    child.wait(timeout=10)
    wait_dead(valkey_pid)
    assert (data / "valkey.pid").exists()  # stale: nobody removed it

    store = procs.store(data)
    store.start()
    assert not store.adopted
    assert store.pid != valkey_pid
    assert store.port == int(port_text)
    assert (data / "valkey.pid").read_text().strip() == str(store.pid)
    with redis.Redis.from_url(store.url) as client:
        assert client.get("survivor") == b"written before the crash"
    assert valkeys_on(data) == [store.pid]


# -- the shared fixture (conftest.py) -------------------------------------------------------------


@pytest.mark.parametrize("run", [1, 2])
def test_redis_url_fixture_starts_each_test_clean(redis_url: str, run: int) -> None:
    with redis.Redis.from_url(redis_url) as client:
        assert client.dbsize() == 0  # the other run's key was flushed
        client.set(f"left-behind-by-run-{run}", b"x")
