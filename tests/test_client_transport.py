"""The Python client's plain-HTTP transport (optserve_client/_transport.py): the standard
library's http.client under httpx, for a third of the CPU per large tensor. Everything else the
client does is tested through it too (it is the default for http:// URLs); these are the parts
of its own: pooled connections, what the socket says mapped to httpx's errors, what it leaves to
httpx's transport."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import httpx
import numpy as np
import pytest

from optserve_client import Client, OptservError
from optserve_client._transport import StdlibTransport


def transport_of(client: Client, url: str) -> httpx.BaseTransport:
    return client._http._transport_for_url(httpx.URL(url))


def test_plain_http_goes_through_it_and_https_or_a_proxy_does_not(monkeypatch) -> None:
    with Client("http://127.0.0.1:9") as client:
        assert isinstance(transport_of(client, "http://127.0.0.1:9/v1"), StdlibTransport)
        assert not isinstance(transport_of(client, "https://example.org/v1"), StdlibTransport)
    given = httpx.HTTPTransport()
    with Client("http://127.0.0.1:9", transport=given) as client:
        assert transport_of(client, "http://127.0.0.1:9/v1") is given
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:3128")
    with Client("http://127.0.0.1:9") as client:
        assert not isinstance(transport_of(client, "http://127.0.0.1:9/v1"), StdlibTransport)
    with pytest.raises(httpx.UnsupportedProtocol):
        StdlibTransport().handle_request(httpx.Request("GET", "https://example.org/"))


def test_large_tensors_come_back_bit_identical_to_httpx_transport(api_url: str) -> None:
    rng = np.random.default_rng(7)
    w0 = rng.standard_normal(1_000_003).astype(np.float32)
    grads = [rng.standard_normal(w0.size).astype(np.float32) for _ in range(3)]
    answers = []
    for transport in (None, httpx.HTTPTransport()):
        with Client(api_url, transport=transport) as client:
            session = client.create_session("adam", {"w": w0}, lr=1e-3)
            try:
                for grad in grads:
                    params = session.push({"w": grad})
                answers.append(params["w"])
                pulled = session.pull()["w"]
                assert np.array_equal(pulled.view(np.uint32), params["w"].view(np.uint32))
            finally:
                session.delete()
    assert np.array_equal(answers[0].view(np.uint32), answers[1].view(np.uint32))


def test_a_connection_the_server_closed_is_replaced_not_failed(server_factory, valkey_server):
    """A restart (or a keep-alive timeout) closes the pooled connection while it sits idle: the
    next call opens a new one by itself, with no retry spent (retries are off here)."""
    server = server_factory(OPTSERVE_REDIS_URL=valkey_server.url)
    with Client(server.url, retries=0) as client:
        session = client.create_session("sgd", {"w": np.zeros(4, np.float32)}, lr=1.0)
        session.push({"w": np.ones(4, np.float32)})
        server.stop()
        server.start()
        params = session.push({"w": np.ones(4, np.float32)})
        assert params["w"].tolist() == [-2.0] * 4


@pytest.fixture
def silent_server() -> Iterator[str]:
    """Accepts connections and reads requests but never answers."""
    listener = socket.create_server(("127.0.0.1", 0))
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def serve() -> None:
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            accepted.append(conn)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    stop.set()
    thread.join()
    for conn in accepted:
        conn.close()
    listener.close()


def test_socket_failures_are_httpx_errors(silent_server: str) -> None:
    transport = StdlibTransport()
    started = time.monotonic()
    with pytest.raises(httpx.ReadTimeout):
        transport.handle_request(
            httpx.Request("GET", f"{silent_server}/healthz", extensions={"timeout": {"read": 0.3}})
        )
    assert time.monotonic() - started < 5
    with socket.create_server(("127.0.0.1", 0)) as taken:
        closed = f"http://127.0.0.1:{taken.getsockname()[1]}"
    with pytest.raises(httpx.ConnectError):
        transport.handle_request(httpx.Request("GET", f"{closed}/healthz"))
    with Client(closed, retries=0) as client, pytest.raises(OptservError) as caught:
        client.list_sessions()
    assert caught.value.code == "transport_error" and caught.value.attempts == 1
