"""docker-compose.yml's topology run from processes, since no Docker engine runs here: one
Valkey, two `optserve serve` replicas, Debian's nginx running deploy/nginx.conf (only its
upstream servers and listen address changed) in front, and workers that reach the service
through nginx only.

Which replica served a request is read from nginx's own access log (`upstream=` in the log
format of deploy/nginx.conf), so these tests depend on no log format of the server.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import httpx
import numpy as np
import pytest

from optserve.api.problems import CODES, TYPE_BASE
from optserve.config import Settings
from optserve_client import Client, RetryPolicy

from .api_helpers import create, from_json
from .conftest import ServerProcess, free_port
from .deploy_files import (
    ROOT,
    Nginx,
    block,
    compose,
    dockerfile_stages,
    image_command,
    named_volumes,
    nginx_config,
    nginx_size,
    service_env,
    value,
)
from .test_concurrency import P0, PUSHES, SHAPES, assert_response_params, grads_of, run_workers

WORKERS = 4
PUSH_LINE = r'"POST /v1/sessions/\w+/gradients[ ?]'


@dataclass
class Topology:
    nginx: Nginx
    replicas: list[ServerProcess]

    @property
    def url(self) -> str:
        return self.nginx.url

    def upstreams(self, request_line: str, count: int) -> list[str]:
        """The upstream address(es) nginx logged for each request whose line starts so
        (several, comma-separated, when nginx had to try the next replica), once there are
        `count` of them: nginx logs a request just after its response went out."""
        pattern = re.compile(rf'"{re.escape(request_line)}[ ?][^"]*" .* upstream=(.+) time=')
        deadline = time.monotonic() + 5
        while True:
            found = pattern.findall(self.nginx.log_path.read_text())
            if len(found) >= count or time.monotonic() > deadline:
                return found
            time.sleep(0.02)

    def count(self, pattern: str) -> int:
        """How many lines of nginx's access log match `pattern`."""
        return len(re.findall(pattern, self.nginx.log_path.read_text()))

    def log_line(self, pattern: str) -> bool:
        """Whether nginx's access log has (or gets within 5 s) a line matching `pattern`."""
        deadline = time.monotonic() + 5
        while not re.search(pattern, self.nginx.log_path.read_text()):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.02)
        return True

    def address(self, replica: int) -> str:
        return f"127.0.0.1:{self.replicas[replica].port}"


def nginx_binary() -> str:
    found = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin")
    if found is None:
        pytest.skip("nginx is not installed and `make tools` could not install Debian's nginx")
    return found


def wait_ready(nginx: Nginx, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert nginx.process.poll() is None, f"nginx exited:\n{nginx.error_log()[-3000:]}"
        try:
            if httpx.get(f"{nginx.url}/healthz", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    raise AssertionError(f"nginx did not answer within {timeout} s:\n{nginx.error_log()[-3000:]}")


@pytest.fixture(scope="module")
def topology(valkey_server, tmp_path_factory) -> Iterator[Topology]:
    binary = nginx_binary()
    directory = tmp_path_factory.mktemp("topology")
    replicas = [
        ServerProcess({"OPTSERVE_REDIS_URL": valkey_server.url}, directory / f"api-{n}.log")
        for n in (1, 2)
    ]
    upstreams = [f"127.0.0.1:{replica.port}" for replica in replicas]
    nginx = Nginx(binary, directory / "nginx", upstreams, free_port())
    try:
        with ThreadPoolExecutor(2) as pool:  # start both at once
            list(pool.map(ServerProcess.start, replicas))
        checked = nginx.check()
        assert checked.returncode == 0, checked.stderr
        nginx.start()
        wait_ready(nginx)
        yield Topology(nginx, replicas)
    finally:
        nginx.stop()
        for replica in replicas:
            replica.stop()


def test_four_workers_through_nginx_end_with_the_exact_sgd_sum(topology, tmp_path):
    """tests/test_concurrency.py's invariant through the proxy: every push acknowledged once,
    versions 1..N without gaps, each response's params the state after exactly the pushes up
    to its version, and the final params p0 - lr * sum(g) exactly."""
    lr = 0.5
    with httpx.Client(base_url=topology.url, timeout=30) as client:
        sid = create(client, {"name": "sgd", "lr": lr}, P0)["id"]
        records = run_workers([topology.url], sid, tmp_path, workers=WORKERS)
        session = client.get(f"/v1/sessions/{sid}").json()
        response = client.get(f"/v1/sessions/{sid}/params")
        assert response.status_code == 200, response.text
        final = {name: from_json(spec) for name, spec in response.json()["params"].items()}

    refused = [r for r in records if r["status"] != 200]
    assert not refused, f"{len(refused)} of {len(records)} pushes refused, e.g. {refused[:3]}"
    assert sorted(r["version"] for r in records) == list(range(1, WORKERS * PUSHES + 1))
    assert session["version"] == WORKERS * PUSHES

    expected = {name: P0[name].astype(np.float64) for name in SHAPES}
    for record in sorted(records, key=lambda r: r["version"]):
        for name, grad in grads_of(record).items():
            expected[name] -= lr * grad
        assert_response_params(record, expected)
    for name in SHAPES:
        np.testing.assert_array_equal(final[name], expected[name].astype(np.float32))

    # The session stuck to one replica: nginx sent every one of its pushes to the same one.
    served = topology.upstreams(f"POST /v1/sessions/{sid}/gradients", WORKERS * PUSHES)
    assert len(served) == WORKERS * PUSHES and len(set(served)) == 1, set(served)
    assert served[0] in {topology.address(0), topology.address(1)}


def test_each_session_sticks_to_one_replica_and_sessions_spread_over_both(topology):
    with httpx.Client(base_url=topology.url, timeout=30) as client:
        sids = [
            create(client, {"name": "sgd"}, {"w": np.zeros(2, np.float32)})["id"] for _ in range(24)
        ]
        for sid in sids:
            for _ in range(3):
                client.get(f"/v1/sessions/{sid}").raise_for_status()
    owners = []
    for sid in sids:
        served = topology.upstreams(f"GET /v1/sessions/{sid}", 3)
        assert len(served) == 3 and len(set(served)) == 1, served
        owners.append(served[0])
    replicas = {topology.address(0), topology.address(1)}
    assert set(owners) == replicas, "consistent hashing put every session on one replica"
    # A create carries no session id: it may go to either replica, and over 24 it went to both.
    assert set(topology.upstreams("POST /v1/sessions", 24)) == replicas


def test_a_session_fails_over_when_its_replica_is_down(topology):
    with httpx.Client(base_url=topology.url, timeout=30) as client:
        sid = create(client, {"name": "sgd", "lr": 1.0}, {"w": np.zeros(2, np.float32)})["id"]
        grads = {"grads": {"w": {"shape": [2], "data": [1.0, 2.0]}}}
        assert client.post(f"/v1/sessions/{sid}/gradients", json=grads).json()["version"] == 1
        (owner,) = set(topology.upstreams(f"POST /v1/sessions/{sid}/gradients", 1))
        down = [topology.address(n) for n in (0, 1)].index(owner)
        topology.replicas[down].kill()
        try:
            response = client.post(f"/v1/sessions/{sid}/gradients", json=grads)
            assert response.status_code == 200, response.text
            assert response.json()["version"] == 2
            assert from_json(response.json()["params"]["w"]).tolist() == [-2.0, -4.0]
        finally:
            topology.replicas[down].start()
    tried = topology.upstreams(f"POST /v1/sessions/{sid}/gradients", 2)[-1]
    assert tried == f"{owner}, {topology.address(1 - down)}"  # nginx tried the owner first


def test_the_request_id_is_kept_or_made_and_logged(topology):
    httpx.get(f"{topology.url}/healthz", headers={"x-request-id": "trace-me-42"}).raise_for_status()
    httpx.get(f"{topology.url}/readyz").raise_for_status()
    assert topology.log_line(r'"GET /healthz HTTP/1.1" 200 .*request_id=trace-me-42 ')
    assert topology.log_line(r'"GET /readyz HTTP/1.1" 200 .*request_id=[0-9a-f]{32} ')


def raw_post(
    url: str, path: str, content_length: int, content_type: str = "application/x-safetensors"
) -> tuple[int, str, bytes]:
    """Send only the headers of a POST with this Content-Length and read the answer (a 413
    comes before any of the body is needed): status, content type, body."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=20) as sock:
        sock.sendall(
            f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {content_length}\r\n\r\n".encode()
        )
        response = http.client.HTTPResponse(sock)
        response.begin()
        return response.status, response.getheader("content-type"), response.read()


def test_too_large_bodies_get_the_apps_413_and_past_nginx_limit_nginxs_own(topology):
    limit = Settings().max_body_bytes
    nginx_limit = nginx_size(value(block(nginx_config(), "server"), "client_max_body_size"))

    status, content_type, body = raw_post(topology.url, "/v1/sessions", limit + 1)
    assert status == 413 and content_type.startswith("application/problem+json")
    assert f"body of {limit + 1} bytes is over the {limit} limit" in body.decode()  # the app's
    json_limit = Settings().max_json_body_bytes  # JSON has its own, smaller bound
    status, _, body = raw_post(topology.url, "/v1/sessions", json_limit + 1, "application/json")
    assert status == 413
    assert f"body of {json_limit + 1} bytes is over the {json_limit} limit" in body.decode()

    status, content_type, body = raw_post(topology.url, "/v1/sessions", nginx_limit + 1)
    assert status == 413 and content_type == "application/problem+json"
    problem = json.loads(body)
    code_status, title = CODES["payload_too_large"]
    assert problem == {
        "type": f"{TYPE_BASE}payload_too_large",
        "title": title,
        "status": code_status,
        "detail": problem["detail"],
        "code": "payload_too_large",
    }
    assert "proxy" in problem["detail"]


def test_the_compose_demo_trains_through_nginx(topology, tmp_path):
    """The compose `demo` service (the Dockerfile's demo stage's command, with compose's
    environment) run here against nginx at the example's `--tiny` size: it exits 0 and writes
    its results."""
    demo = compose()["services"]["demo"]
    command = image_command(dockerfile_stages()[demo["build"]["target"]])
    assert command[0] == "python"
    out = command.index("--out") + 1
    assert command[out] in named_volumes(demo)  # where compose keeps the results
    command[0], command[out] = sys.executable, str(tmp_path / "results")
    command.append("--tiny")  # the same run, a few seconds long
    pushes_before = topology.count(PUSH_LINE)
    done = subprocess.run(
        command,
        cwd=ROOT,
        env={**os.environ, **service_env(demo), "OPTSERVE_URL": topology.url},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert list((tmp_path / "results").iterdir()), "the demo wrote no results"
    assert topology.count(PUSH_LINE) > pushes_before  # it pushed through nginx


# (last in the module: it takes both replicas down)
def test_no_replica_answering_is_a_503_problem_and_the_client_retries_through(topology):
    """nginx's own 502 becomes the API's kind of answer: a problem+json 503 with Retry-After,
    which the Python client retries; once a replica is back, the retried push applies once."""
    with Client(topology.url, retries=RetryPolicy(attempts=60, backoff=0.2, max_backoff=0.5)) as c:
        session = c.create_session({"name": "sgd", "lr": 1.0}, {"w": np.zeros(2, np.float32)})
        for replica in topology.replicas:
            replica.kill()
        try:
            raw = httpx.post(f"{topology.url}/v1/sessions/{session.id}/gradients", json={})
            code_status, title = CODES["api_unavailable"]
            assert raw.status_code == code_status == 503
            assert raw.headers["content-type"] == "application/problem+json"
            assert raw.headers["retry-after"] == "1"
            problem = raw.json()
            assert (problem["code"], problem["title"]) == ("api_unavailable", title)
            assert problem["type"] == f"{TYPE_BASE}api_unavailable"

            restart = threading.Timer(1.0, lambda: [r.start() for r in topology.replicas])
            restart.start()  # while the client is retrying
            params = session.push({"w": np.array([1.0, 2.0], np.float32)})
            restart.join()
        finally:
            for replica in topology.replicas:
                if replica.process is None or replica.process.poll() is not None:
                    replica.start()
        assert session.version == 1
        np.testing.assert_array_equal(params["w"], [-1.0, -2.0])
