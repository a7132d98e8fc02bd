"""Shared fixtures. Tests run against a real Redis-protocol server, never a fake.

One embedded Valkey (the same binary and code path as `optserve serve` without
OPTSERVE_REDIS_URL) serves the whole test session on a free port; `redis_url` hands each test
that server emptied with FLUSHALL.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import redis

from optserve.store.embedded import EmbeddedValkey

# -- Redis ----------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def valkey_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedValkey]:
    """A real valkey-server for the whole session; `.url` is its redis:// URL."""
    server = EmbeddedValkey(tmp_path_factory.mktemp("valkey"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def redis_url(valkey_server: EmbeddedValkey) -> str:
    """URL of the session's server, emptied so this test starts clean."""
    client = redis.Redis.from_url(valkey_server.url)
    try:
        client.flushall()
    finally:
        client.close()
    return valkey_server.url


# -- optserve servers -----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """`optserve serve` as a real child process on a free port (real uvicorn, real HTTP)."""

    def __init__(self, env: dict[str, str | None], log_path: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        merged = {**os.environ, **env}
        self.env = {k: v for k, v in merged.items() if v is not None}  # None removes a variable
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 60.0) -> ServerProcess:
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child writes it while it runs
        self.process = subprocess.Popen(
            [sys.executable, "-m", "optserve", "serve", "--port", str(self.port)],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"optserve exited early:\n{self.log_path.read_text()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"optserve did not become ready:\n{self.log_path.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs, as in a crash."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()


@pytest.fixture(scope="session")
def api_server(
    valkey_server: EmbeddedValkey, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    """One optserve for the test session, on the shared Valkey (tests use their own sessions)."""
    log = tmp_path_factory.mktemp("api") / "optserve.log"
    server = ServerProcess({"OPTSERVE_REDIS_URL": valkey_server.url}, log).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def api_url(api_server: ServerProcess) -> str:
    return api_server.url


@pytest.fixture
def server_factory(tmp_path: Path) -> Iterator[Callable[..., ServerProcess]]:
    """Start extra optserve processes (own env, e.g. an embedded store); all stopped at the end."""
    started: list[ServerProcess] = []

    def start(**env: str | None) -> ServerProcess:
        server = ServerProcess(env, tmp_path / f"optserve-{len(started)}.log").start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


# -- a server that needs API keys (tests/test_auth.py, tests/test_schemathesis.py) -----------------

#: Two tenants' static keys, as OPTSERVE_API_KEYS holds them.
KEY_A = "key-a-0123456789abcdef"
KEY_B = "key-b-0123456789abcdef"


@pytest.fixture(scope="session")
def auth_server(
    valkey_server: EmbeddedValkey, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    """optserve with tenants team-a and team-b (KEY_A, KEY_B) and small bounds, on database 1 of
    the shared Valkey (so keys stored there never reach `api_server`, which runs open on db 0)."""
    env = {
        "OPTSERVE_REDIS_URL": f"{valkey_server.url}/1",
        "OPTSERVE_API_KEYS": f"team-a:{KEY_A},team-b:{KEY_B}",
        "OPTSERVE_API_KEY_CACHE_S": "0.2",
        "OPTSERVE_MAX_BODY_BYTES": "100000",
        "OPTSERVE_MAX_TENSORS_PER_SESSION": "3",
        "OPTSERVE_MAX_ELEMENTS_PER_TENSOR": "1000",
        "OPTSERVE_MAX_ELEMENTS_PER_SESSION": "1500",
        "OPTSERVE_MAX_TENSOR_NAME_LENGTH": "32",
        "OPTSERVE_MAX_SESSIONS_PER_TENANT": "4",
        "OPTSERVE_LONG_POLL_MAX_S": "0.2",  # generated wait_s values stay quick
    }
    log = tmp_path_factory.mktemp("auth") / "optserve.log"
    server = ServerProcess(env, log).start()
    try:
        yield server
    finally:
        server.stop()


# -- both engines ---------------------------------------------------------------------------------

#: The engines the behaviour tests run against (OPTSERVE_ENGINE): the same tests, both engines.
ENGINES = ["write-through", "hot"]
#: Short hot-engine leases so that takeover tests wait about a second, not the default two.
HOT_ENV = {"OPTSERVE_ENGINE": "hot", "OPTSERVE_HOT_LEASE_MS": "1000"}


@pytest.fixture(scope="session")
def hot_api_server(
    valkey_server: EmbeddedValkey, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    """One optserve with the hot engine for the test session, on the shared Valkey."""
    log = tmp_path_factory.mktemp("api-hot") / "optserve.log"
    server = ServerProcess({"OPTSERVE_REDIS_URL": valkey_server.url, **HOT_ENV}, log).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(params=ENGINES)
def engine(request: pytest.FixtureRequest) -> str:
    """Parametrizes a test over both engines."""
    return request.param


@pytest.fixture
def engine_env(engine: str, valkey_server: EmbeddedValkey) -> dict[str, str | None]:
    """server_factory(**engine_env): a server of the test's engine on the shared Valkey."""
    env: dict[str, str | None] = {"OPTSERVE_REDIS_URL": valkey_server.url}
    return env | HOT_ENV if engine == "hot" else env


@pytest.fixture
def engine_api_server(engine: str, request: pytest.FixtureRequest) -> ServerProcess:
    """The shared server of the test's engine."""
    return request.getfixturevalue("hot_api_server" if engine == "hot" else "api_server")


@pytest.fixture
def engine_api_url(engine_api_server: ServerProcess) -> str:
    return engine_api_server.url


@pytest.fixture
def two_replicas(engine_api_server, server_factory, engine_env) -> list[ServerProcess]:
    """Two processes of the test's engine on the shared Valkey: the shared one and a new one."""
    return [engine_api_server, server_factory(**engine_env)]
