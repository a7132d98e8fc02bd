"""The Python client's plain-HTTP transports, under httpx for about half of the CPU per large
tensor: the sync client's on the standard library's http.client
(optserve_client/_transport.py), the async client's on asyncio's socket calls
(optserve_client/_async_transport.py). Everything else the clients do is tested through them
too (they are the default for http:// URLs); these are the parts of their own: pooled
connections, HTTP/1.1 framing (the async one parses it itself), what the socket says mapped to
httpx's errors, what they leave to httpx's transport."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest

from optserve_client import AsyncClient, Client, OptservError
from optserve_client._async_transport import AsyncPlainTransport
from optserve_client._transport import StdlibTransport


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


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


# -- the async client's transport ----------------------------------------------------------------


def async_transport_of(client: AsyncClient, url: str) -> httpx.AsyncBaseTransport:
    return client._http._transport_for_url(httpx.URL(url))


@pytest.mark.anyio
async def test_async_plain_http_goes_through_it_and_https_or_a_proxy_does_not(monkeypatch):
    async with AsyncClient("http://127.0.0.1:9") as client:
        assert isinstance(async_transport_of(client, "http://127.0.0.1:9/v1"), AsyncPlainTransport)
        assert not isinstance(async_transport_of(client, "https://x.org/v1"), AsyncPlainTransport)
    given = httpx.AsyncHTTPTransport()
    async with AsyncClient("http://127.0.0.1:9", transport=given) as client:
        assert async_transport_of(client, "http://127.0.0.1:9/v1") is given
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:3128")
    async with AsyncClient("http://127.0.0.1:9") as client:
        proxied = async_transport_of(client, "http://127.0.0.1:9/v1")
        assert not isinstance(proxied, AsyncPlainTransport)
    with pytest.raises(httpx.UnsupportedProtocol):
        await AsyncPlainTransport().handle_async_request(httpx.Request("GET", "https://x.org/"))


@pytest.mark.anyio
async def test_async_large_tensors_come_back_bit_identical_to_httpx_transport(api_url: str):
    """Every push's params are kept while later responses arrive: the transport receives into
    a buffer it reuses, so each response must be a copy of its own."""
    rng = np.random.default_rng(8)
    w0 = rng.standard_normal(1_000_003).astype(np.float32)
    grads = [rng.standard_normal(w0.size).astype(np.float32) for _ in range(3)]
    answers = []
    for transport in (None, httpx.AsyncHTTPTransport()):
        async with AsyncClient(api_url, transport=transport) as client:
            session = await client.create_session("adam", {"w": w0}, lr=1e-3)
            try:
                kept = [(await session.push({"w": grad}))["w"] for grad in grads]
                pulled = (await session.pull())["w"]
                assert np.array_equal(pulled.view(np.uint32), kept[-1].view(np.uint32))
            finally:
                await session.delete()
        answers.append(kept)
    for ours, theirs in zip(*answers, strict=True):
        assert np.array_equal(ours.view(np.uint32), theirs.view(np.uint32))
    assert not np.array_equal(answers[0][0], answers[0][1])


@pytest.mark.anyio
async def test_async_a_connection_the_server_closed_is_replaced_not_failed(
    server_factory, valkey_server
):
    server = server_factory(OPTSERVE_REDIS_URL=valkey_server.url)
    async with AsyncClient(server.url, retries=0) as client:
        session = await client.create_session("sgd", {"w": np.zeros(4, np.float32)}, lr=1.0)
        await session.push({"w": np.ones(4, np.float32)})
        server.stop()
        server.start()
        params = await session.push({"w": np.ones(4, np.float32)})
        assert params["w"].tolist() == [-2.0] * 4


@pytest.mark.anyio
async def test_async_socket_failures_are_httpx_errors(silent_server: str) -> None:
    transport = AsyncPlainTransport()
    started = time.monotonic()
    with pytest.raises(httpx.ReadTimeout):
        await transport.handle_async_request(
            httpx.Request("GET", f"{silent_server}/healthz", extensions={"timeout": {"read": 0.3}})
        )
    assert time.monotonic() - started < 5
    with socket.create_server(("127.0.0.1", 0)) as taken:
        closed = f"http://127.0.0.1:{taken.getsockname()[1]}"
    with pytest.raises(httpx.ConnectError):
        await transport.handle_async_request(httpx.Request("GET", f"{closed}/healthz"))
    async with AsyncClient(closed, retries=0) as client:
        with pytest.raises(OptservError) as caught:
            await client.list_sessions()
    assert caught.value.code == "transport_error" and caught.value.attempts == 1


#: What the scripted server answers, by path (a response, then whether it closes after it).
SCRIPTS: dict[bytes, tuple[bytes, bool]] = {
    b"/chunked": (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5;note=x\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: 1\r\n\r\n",
        False,
    ),
    b"/continue": (
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
        False,
    ),
    b"/empty": (b"HTTP/1.1 204 No Content\r\n\r\n", False),
    b"/head": (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", False),
    b"/close": (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok", True),
    b"/eof": (b"HTTP/1.1 200 OK\r\n\r\nuntil the end", True),
    b"/short": (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc", True),
    b"/stall": (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc", False),
    b"/slow": (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", False),  # after 0.3 s
}


class ScriptedServer:
    """A raw HTTP/1.1 server on a thread: answers each request by SCRIPTS (`/echo` and
    `/request` send back the body, or the request head and body, as read), counts connections
    and the most requests it had in hand at once."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0), backlog=64)
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.connections = 0
        self.open: list[socket.socket] = []
        self.busy = self.busiest = 0
        self._count = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            self.open.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        pending = b""
        with conn:
            while True:
                while b"\r\n\r\n" not in pending:
                    data = conn.recv(65536)
                    if not data:
                        return
                    pending += data
                head, pending = pending.split(b"\r\n\r\n", 1)
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                while len(pending) < length:
                    pending += conn.recv(1 << 20)
                body, pending = pending[:length], pending[length:]
                path = head.split(b" ")[1]
                if path in (b"/echo", b"/request"):
                    sent = body if path == b"/echo" else head + b"\r\n\r\n" + body
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(sent))
                    conn.sendall(sent)
                    continue
                with self._count:
                    self.busy += 1
                    self.busiest = max(self.busiest, self.busy)
                if path == b"/slow":
                    time.sleep(0.3)
                response, closes = SCRIPTS[path]
                with self._count:
                    self.busy -= 1
                conn.sendall(response)
                if closes:
                    return

    def close(self) -> None:
        self.listener.close()
        for conn in self.open:
            conn.close()


@pytest.fixture
def scripted() -> Iterator[ScriptedServer]:
    server = ScriptedServer()
    yield server
    server.close()


@pytest.mark.anyio
async def test_async_framing_keep_alive_and_broken_responses(scripted: ScriptedServer) -> None:
    transport = AsyncPlainTransport()
    async with httpx.AsyncClient(transport=transport, base_url=scripted.url) as client:
        assert (await client.get("/chunked")).content == b"hello world"
        big = bytes(range(256)) * 4096  # 1 MiB, sent from its buffer
        assert (await client.post("/echo", content=big)).content == big
        response = await client.get("/continue")  # the interim 100 is skipped
        assert response.status_code == 200 and response.content == b"ok"
        response = await client.get("/empty")
        assert response.status_code == 204 and response.content == b""
        response = await client.head("/head")  # a length, and no body after it
        assert response.headers["content-length"] == "5" and response.content == b""
        assert scripted.connections == 1, "all of it on one keep-alive connection"
        assert (await client.get("/close")).content == b"ok"  # Connection: close: not pooled
        assert (await client.get("/eof")).content == b"until the end"  # no length: to EOF
        assert scripted.connections == 2
        assert (await client.get("/chunked")).content == b"hello world"
        assert scripted.connections == 3
        with pytest.raises(httpx.RemoteProtocolError):  # 3 of 10 bytes, then closed (on the
            await client.get("/short")  # pooled third connection)
        with pytest.raises(httpx.ReadTimeout):  # 3 of 10 bytes, then nothing (a fourth)
            await client.get("/stall", timeout=httpx.Timeout(5, read=0.3))
        assert not any(transport._idle.values()), "a broken connection is never pooled"
        assert (await client.get("/chunked")).content == b"hello world"
        assert scripted.connections == 5


@pytest.mark.anyio
async def test_async_a_streamed_body_goes_out_whole_with_its_length(scripted: ScriptedServer):
    async def pieces() -> AsyncIterator[bytes]:
        for piece in (b"abc", b"defg"):
            yield piece

    async with httpx.AsyncClient(transport=AsyncPlainTransport(), base_url=scripted.url) as client:
        seen = (await client.post("/request", content=pieces())).content
    head, _, body = seen.partition(b"\r\n\r\n")
    lines = [line.lower() for line in head.split(b"\r\n")]
    assert lines[0] == b"post /request http/1.1" and body == b"abcdefg"
    assert b"content-length: 7" in lines
    assert not any(line.startswith(b"transfer-encoding") for line in lines)


def test_sync_a_streamed_body_goes_out_whole_with_its_length(scripted: ScriptedServer):
    with httpx.Client(transport=StdlibTransport(), base_url=scripted.url) as client:
        seen = client.post("/request", content=iter([b"abc", b"defg"])).content
    head, _, body = seen.partition(b"\r\n\r\n")
    lines = [line.lower() for line in head.split(b"\r\n")]
    assert lines[0] == b"post /request http/1.1" and body == b"abcdefg"
    assert b"content-length: 7" in lines
    assert not any(line.startswith(b"transfer-encoding") for line in lines)


@pytest.mark.anyio
async def test_async_a_cancelled_request_leaves_no_connection_behind(scripted: ScriptedServer):
    transport = AsyncPlainTransport()
    async with httpx.AsyncClient(transport=transport, base_url=scripted.url) as client:
        task = asyncio.ensure_future(client.get("/stall"))
        await asyncio.sleep(0.3)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert not any(transport._idle.values())
        assert (await client.get("/chunked")).content == b"hello world"
        assert scripted.connections == 2


@pytest.mark.anyio
async def test_async_requests_past_the_connection_limit_wait_their_turn(scripted):
    transport = AsyncPlainTransport(max_connections=2)
    async with httpx.AsyncClient(transport=transport, base_url=scripted.url) as client:
        responses = await asyncio.gather(*(client.get("/slow") for _ in range(6)))
        assert [r.content for r in responses] == [b"ok"] * 6
        assert scripted.busiest == 2 and scripted.connections == 2
    transport = AsyncPlainTransport(max_connections=1)
    async with httpx.AsyncClient(transport=transport, base_url=scripted.url) as client:
        slow = asyncio.ensure_future(client.get("/slow"))
        await asyncio.sleep(0.05)
        with pytest.raises(httpx.PoolTimeout):
            await client.get("/chunked", timeout=httpx.Timeout(5, pool=0.1))
        assert (await slow).content == b"ok"
        assert (await client.get("/chunked")).content == b"hello world"


def test_sync_requests_past_the_connection_limit_wait_their_turn(scripted):
    transport = StdlibTransport(max_connections=2)
    with httpx.Client(transport=transport, base_url=scripted.url) as client:
        with ThreadPoolExecutor(6) as pool:
            responses = list(pool.map(lambda _: client.get("/slow"), range(6)))
        assert [r.content for r in responses] == [b"ok"] * 6
        assert scripted.busiest == 2
    transport = StdlibTransport(max_connections=1)
    with (
        httpx.Client(transport=transport, base_url=scripted.url) as client,
        ThreadPoolExecutor(1) as pool,
    ):
        slow = pool.submit(client.get, "/slow")
        time.sleep(0.05)
        with pytest.raises(httpx.PoolTimeout):
            client.get("/chunked", timeout=httpx.Timeout(5, pool=0.1))
        assert slow.result().content == b"ok"


@pytest.mark.parametrize("anyio_backend", ["trio"])
@pytest.mark.anyio
async def test_async_client_under_trio_goes_through_httpx_transport(api_url: str) -> None:
    """asyncio's socket calls need asyncio: under trio the same client works through httpx's."""
    async with AsyncClient(api_url) as client:
        session = await client.create_session("sgd", {"w": np.zeros(4, np.float32)}, lr=1.0)
        params = await session.push({"w": np.ones(4, np.float32)})
        await session.delete()
        transport = async_transport_of(client, api_url)
        assert isinstance(transport, AsyncPlainTransport) and transport._other_loops is not None
    assert params["w"].tolist() == [-1.0] * 4
