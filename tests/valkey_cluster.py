"""A real Redis Cluster for tests: three valkey-server masters from the binary optserve ships.

Each node runs in its own temp dir with `--cluster-enabled yes`; the fixture assigns the 16384
slots itself (CLUSTER ADDSLOTSRANGE, one third per node), joins the nodes (CLUSTER MEET) and
waits until every node reports `cluster_state:ok` and agrees on the slot map. No replicas: the
tests are about data spread over masters, not failover.
"""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path

import redis

from optserve.store.embedded import default_binary

HOST = "127.0.0.1"
SLOTS = 16384
#: A node talks to the others on its port + 10000 (the cluster bus).
BUS_OFFSET = 10000


def free_cluster_port() -> int:
    """A free port whose cluster-bus port (port + 10000) is free too."""
    for _ in range(200):
        with socket.socket() as sock:
            sock.bind((HOST, 0))
            port = sock.getsockname()[1]
        if port + BUS_OFFSET > 65535:
            continue
        with socket.socket() as bus:
            try:
                bus.bind((HOST, port + BUS_OFFSET))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port pair for a cluster node")


class ValkeyCluster:
    """`masters` valkey-server processes joined into one cluster, slots split evenly."""

    def __init__(self, base_dir: Path, masters: int = 3, binary: Path | None = None) -> None:
        self.base_dir = base_dir
        self.binary = binary or default_binary()
        self.count = masters
        self.ports: list[int] = []
        self.processes: list[subprocess.Popen] = []

    @property
    def urls(self) -> list[str]:
        return [f"redis://{HOST}:{port}" for port in self.ports]

    @property
    def url(self) -> str:
        """Any one node is enough to find the whole cluster."""
        return self.urls[0]

    def slot_ranges(self) -> list[tuple[int, int]]:
        """Node i owns slots [first, last] of its share."""
        share = SLOTS // self.count
        bounds = [i * share for i in range(self.count)] + [SLOTS]
        return [(bounds[i], bounds[i + 1] - 1) for i in range(self.count)]

    def start(self, timeout: float = 30.0) -> ValkeyCluster:
        try:
            for index in range(self.count):
                self._spawn(index)
            clients = [redis.Redis(host=HOST, port=port) for port in self.ports]
            try:
                for port, client in zip(self.ports, clients, strict=True):
                    _wait_ping(client, port, timeout)
                for client, (first, last) in zip(clients, self.slot_ranges(), strict=True):
                    client.execute_command("CLUSTER", "ADDSLOTSRANGE", first, last)
                for port in self.ports[1:]:
                    clients[0].execute_command("CLUSTER", "MEET", HOST, port)
                self._wait_ok(clients, timeout)
            finally:
                for client in clients:
                    client.close()
        except BaseException:
            self.stop()
            raise
        return self

    def _spawn(self, index: int) -> None:
        port = free_cluster_port()
        self.ports.append(port)
        self.processes.append(self._launch(index, port))

    def _launch(self, index: int, port: int) -> subprocess.Popen:
        """valkey-server for node `index`; its nodes.conf and AOF survive a restart."""
        data = self.base_dir / f"node-{index}"
        data.mkdir(parents=True, exist_ok=True)
        args = [
            str(self.binary),
            "--bind", HOST,
            "--port", str(port),
            "--cluster-enabled", "yes",
            "--cluster-config-file", str(data / "nodes.conf"),
            "--cluster-node-timeout", "5000",
            "--dir", str(data),
            "--appendonly", "yes",
            "--save", "",
            "--logfile", str(data / "valkey.log"),
        ]  # fmt: skip
        return subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )

    def kill(self, index: int) -> None:
        """SIGKILL one node, as in a crash."""
        self.processes[index].kill()
        self.processes[index].wait()

    def restart(self, index: int, timeout: float = 30.0) -> None:
        """Start a killed node again on its port and files; wait until the cluster is ok."""
        self.processes[index] = self._launch(index, self.ports[index])
        clients = [redis.Redis(host=HOST, port=port) for port in self.ports]
        try:
            _wait_ping(clients[index], self.ports[index], timeout)
            self._wait_ok(clients, timeout)
        finally:
            for client in clients:
                client.close()

    def _wait_ok(self, clients: list[redis.Redis], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            infos = [client.execute_command("CLUSTER", "INFO") for client in clients]
            ok = all(b"cluster_state:ok" in _bytes(info) for info in infos)
            known = all(
                len(client.execute_command("CLUSTER", "SLOTS")) == self.count for client in clients
            )
            if ok and known:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"cluster not ok within {timeout}s: {infos}")
            time.sleep(0.05)

    def node_of_slot(self, slot: int) -> int:
        """Index of the node that owns `slot`."""
        for index, (first, last) in enumerate(self.slot_ranges()):
            if first <= slot <= last:
                return index
        raise ValueError(slot)

    def client(self, index: int) -> redis.Redis:
        return redis.Redis(host=HOST, port=self.ports[index])

    def flushall(self) -> None:
        for index in range(self.count):
            with self.client(index) as client:
                client.flushall()

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.terminate()
        for process in self.processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _wait_ping(client: redis.Redis, port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            client.ping()
            return
        except redis.ConnectionError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"cluster node on port {port} did not start") from None
            time.sleep(0.02)


def _bytes(value: bytes | str) -> bytes:
    return value if isinstance(value, bytes) else value.encode()
