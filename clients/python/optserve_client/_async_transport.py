"""A plain-HTTP transport for `AsyncClient` on asyncio's own socket calls.

Why not httpx's own: its async HTTP/1.1 (httpcore and h11) parses, copies and joins a response
in 64 KiB pieces: 8.2 ms of CPU per 1e6-parameter push and its params (4 MB each way). Here
the body goes out with `loop.sock_sendall` straight from its buffer, and a response of known
length comes in with `loop.sock_recv_into` into a receive buffer the transport keeps (no fresh
pages to fault in per response), copied once into the bytes httpx hands on: 3.6 ms for the
same round trip (bench/client_bench.py). The rules are the sync transport's
(_transport.py): `http://` only, a keep-alive pool, idle connections the server closed dropped
before reuse, a request never sent twice by the transport itself, socket failures mapped to
httpx's errors. Under another event loop than asyncio's (trio, through anyio) httpx's own
transport serves instead.
"""

from __future__ import annotations

import asyncio
import socket
from dataclasses import dataclass

import httpx

from ._transport import (
    MAX_CONNECTIONS,
    MAX_IDLE,
    pool_timeout,
    raise_mapped,
    readable,
    request_headers,
)

#: A response head larger than this is refused (a server gone wrong, not optserve).
MAX_HEAD_BYTES = 64 * 1024
#: Receive size while the body's length is not known yet (the head, chunked bodies).
RECV_BYTES = 64 * 1024
#: A body this small goes out in the same send as the request head.
SMALL_BODY = 64 * 1024
#: Receive buffers up to this size are kept for the next response (at most MAX_IDLE of them).
KEEP_BUFFER_BYTES = 64 * 1024 * 1024


@dataclass
class _Received:
    status: int
    reason: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes
    reusable: bool


class AsyncPlainTransport(httpx.AsyncBaseTransport):
    """httpx async transport for plain HTTP/1.1 with keep-alive, on asyncio's socket calls."""

    def __init__(self, max_connections: int = MAX_CONNECTIONS) -> None:
        self._idle: dict[tuple[str, int], list[socket.socket]] = {}
        self._buffers: list[bytearray] = []  # receive buffers for the next responses
        self._other_loops: httpx.AsyncHTTPTransport | None = None
        self._max_connections = max_connections
        # a semaphore belongs to the event loop it first waited on: one per loop (the last)
        self._slots_loop: asyncio.AbstractEventLoop | None = None
        self._slots = asyncio.Semaphore(max_connections)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.scheme != "http":
            raise httpx.UnsupportedProtocol(f"{request.url.scheme!r} needs httpx's transport")
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # not asyncio (trio): httpx's transport runs on any anyio loop
            if self._other_loops is None:
                self._other_loops = httpx.AsyncHTTPTransport()
            return await self._other_loops.handle_async_request(request)
        timeout = request.extensions.get("timeout", {})
        if self._slots_loop is not loop:
            self._slots_loop, self._slots = loop, asyncio.Semaphore(self._max_connections)
        slots = self._slots
        try:
            async with asyncio.timeout(timeout.get("pool")):
                await slots.acquire()
        except TimeoutError:
            raise pool_timeout(self._max_connections, timeout.get("pool")) from None
        try:
            return await self._round_trip(loop, request, timeout)
        finally:
            slots.release()

    async def _round_trip(
        self,
        loop: asyncio.AbstractEventLoop,
        request: httpx.Request,
        timeout: dict[str, float | None],
    ) -> httpx.Response:
        origin = (request.url.host, request.url.port or 80)
        body = await request.aread()
        sock = await self._checkout(loop, origin, timeout.get("connect"))
        reader = _Reader(loop, sock, self._buffers.pop() if self._buffers else bytearray())
        phase = "write"
        try:
            async with asyncio.timeout(timeout.get("write")):
                await _send(loop, sock, _head(request, body), body)
            phase = "read"
            async with asyncio.timeout(timeout.get("read")):
                received = await _receive(reader, request.method)
        except BaseException as exc:
            sock.close()
            raise_mapped(exc, phase)
        finally:
            if len(reader.buffer) <= KEEP_BUFFER_BYTES and len(self._buffers) < MAX_IDLE:
                self._buffers.append(reader.buffer)
        if received.reusable:
            self._checkin(origin, sock)
        else:
            sock.close()
        return httpx.Response(
            received.status,
            headers=received.headers,
            stream=httpx.ByteStream(received.body),  # one bytes object: read without a copy
            extensions={"http_version": b"HTTP/1.1", "reason_phrase": received.reason},
        )

    async def aclose(self) -> None:
        idle, self._idle = self._idle, {}
        for socks in idle.values():
            for sock in socks:
                sock.close()
        if self._other_loops is not None:
            await self._other_loops.aclose()

    async def _checkout(
        self, loop: asyncio.AbstractEventLoop, origin: tuple[str, int], timeout: float | None
    ) -> socket.socket:
        pooled = self._idle.get(origin, [])
        while pooled:
            sock = pooled.pop()
            if not readable(sock):
                return sock
            sock.close()
        try:
            async with asyncio.timeout(timeout):
                return await _connect(loop, *origin)
        except BaseException as exc:
            raise_mapped(exc, "connect")

    def _checkin(self, origin: tuple[str, int], sock: socket.socket) -> None:
        pooled = self._idle.setdefault(origin, [])
        if len(pooled) < MAX_IDLE:
            pooled.append(sock)
        else:
            sock.close()


async def _connect(loop: asyncio.AbstractEventLoop, host: str, port: int) -> socket.socket:
    """A connected non-blocking socket to the first address of `host` that answers."""
    error: OSError | None = None
    for family, kind, proto, _, address in await loop.getaddrinfo(
        host, port, type=socket.SOCK_STREAM
    ):
        sock = socket.socket(family, kind, proto)
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, address)
        except OSError as exc:
            sock.close()
            error = exc
            continue
        except BaseException:
            sock.close()
            raise
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock
    raise error or OSError(f"no address for {host!r}")


def _head(request: httpx.Request, body: bytes) -> bytes:
    """The request line and headers."""
    lines = [b"%s %s HTTP/1.1" % (request.method.encode("ascii"), request.url.raw_path)]
    lines += [name + b": " + value for name, value in request_headers(request, body)]
    return b"\r\n".join(lines) + b"\r\n\r\n"


async def _send(
    loop: asyncio.AbstractEventLoop, sock: socket.socket, head: bytes, body: bytes
) -> None:
    if len(body) <= SMALL_BODY:
        await loop.sock_sendall(sock, head + body)
        return
    await loop.sock_sendall(sock, head)
    await loop.sock_sendall(sock, memoryview(body))


class _Reader:
    """The bytes of one connection as they come: lines for heads and chunk sizes, then bodies
    received into `buffer` (the transport's, kept for the next response) and copied out once."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, sock: socket.socket, buffer: bytearray
    ) -> None:
        self.loop = loop
        self.sock = sock
        self.buffer = buffer  # bodies of known length are received here (grown as needed)
        self.pending = bytearray()  # received, not consumed yet
        self._scratch = bytearray(RECV_BYTES)

    async def more(self) -> bool:
        """Receive into `pending`; False at EOF."""
        count = await self.loop.sock_recv_into(self.sock, self._scratch)
        self.pending += memoryview(self._scratch)[:count]
        return count > 0

    async def until(self, marker: bytes, limit: int, what: str) -> bytes:
        """Everything up to `marker` (consumed with it)."""
        searched = 0
        while (end := self.pending.find(marker, searched)) < 0:
            if len(self.pending) > limit:
                raise httpx.RemoteProtocolError(f"{what} longer than {limit} bytes")
            searched = max(0, len(self.pending) - len(marker) + 1)
            if not await self.more():
                raise httpx.RemoteProtocolError(f"the server closed the connection in {what}")
        found = bytes(self.pending[:end])
        del self.pending[: end + len(marker)]
        return found

    async def exactly(self, length: int) -> bytes:
        if len(self.buffer) < length:
            self.buffer = bytearray(length)
        filled = min(length, len(self.pending))
        self.buffer[:filled] = self.pending[:filled]
        del self.pending[:filled]
        view = memoryview(self.buffer)[:length]
        while filled < length:
            count = await self.loop.sock_recv_into(self.sock, view[filled:])
            if count == 0:
                raise httpx.RemoteProtocolError(
                    f"the server closed the connection {length - filled} bytes before the "
                    "end of the body"
                )
            filled += count
        return bytes(view)

    async def chunked(self) -> bytes:
        out = bytearray()
        while True:
            line = await self.until(b"\r\n", MAX_HEAD_BYTES, "a chunk size")
            try:
                size = int(line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                raise httpx.RemoteProtocolError(f"bad chunk size {line[:40]!r}") from None
            if size == 0:
                while await self.until(b"\r\n", MAX_HEAD_BYTES, "the trailers"):
                    pass  # trailers: not used
                return bytes(out)
            out += await self.exactly(size)
            if await self.until(b"\r\n", 2, "a chunk's end"):
                raise httpx.RemoteProtocolError("a chunk longer than its size")

    async def to_eof(self) -> bytes:
        while await self.more():
            pass
        out, self.pending = bytes(self.pending), bytearray()
        return out


async def _receive(reader: _Reader, method: str) -> _Received:
    while True:
        if not reader.pending and not await reader.more():
            raise httpx.RemoteProtocolError("the server closed the connection without a response")
        head = await reader.until(b"\r\n\r\n", MAX_HEAD_BYTES, "the response head")
        version, status, reason, headers = _parse_head(head)
        if not (100 <= status < 200 and status != 101):
            break  # an interim response (100 Continue, 103 Early Hints) has no body: skip it
    fields: dict[bytes, list[bytes]] = {}
    for name, value in headers:
        fields.setdefault(name.lower(), []).append(value.strip())
    tokens = {t.strip().lower() for v in fields.get(b"connection", []) for t in v.split(b",")}
    reusable = b"close" not in tokens if version == b"HTTP/1.1" else b"keep-alive" in tokens
    lengths = set(fields.get(b"content-length", []))
    coding = b",".join(fields.get(b"transfer-encoding", [])).lower()
    body: bytes
    if method == "HEAD" or status in (101, 204, 304):
        body, reusable = b"", reusable and status != 101
    elif coding:
        if coding.strip() != b"chunked":  # none is asked for (no TE header is sent)
            raise httpx.RemoteProtocolError(f"unsupported transfer-encoding {coding!r}")
        body = await reader.chunked()
    elif lengths:
        if len(lengths) > 1 or not next(iter(lengths)).isdigit():
            raise httpx.RemoteProtocolError(f"bad content-length {sorted(lengths)}")
        body = await reader.exactly(int(next(iter(lengths))))
    else:  # delimited by the end of the connection
        body, reusable = await reader.to_eof(), False
    if reader.pending:  # bytes after the response: the connection is out of step
        reusable = False
    return _Received(status, reason, headers, body, reusable)


def _parse_head(head: bytes) -> tuple[bytes, int, bytes, list[tuple[bytes, bytes]]]:
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
        raise httpx.RemoteProtocolError(f"not an HTTP/1.x status line: {lines[0][:80]!r}")
    headers = []
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon or not name or name != name.strip():
            raise httpx.RemoteProtocolError(f"bad header line {line[:80]!r}")
        headers.append((name, value.strip()))
    return parts[0], int(parts[1]), parts[2] if len(parts) > 2 else b"", headers
