"""A plain-HTTP transport for `Client` on the standard library's http.client.

Why not httpx's own: its HTTP/1.1 (h11) is pure Python and hands a response over in 64 KiB
pieces, each parsed, copied and joined again, on the worker that should be training.
http.client reads a body of known length in one buffered call and sends the request body
straight to the socket: 2.8 ms of CPU for a 1e6-parameter push and its params (4 MB each way)
against httpx's 4.9 (bench/client_bench.py). httpx stays the client (timeouts, headers, errors);
only the sync transport for `http://` URLs is this one (_async_transport.py is the async
client's). `https://` keeps httpx's, where TLS costs more than the parsing and verification
settings live there.

Pooled connections are checked before reuse: one the server closed while it sat idle (a
keep-alive timeout, a restart) is readable, so it is dropped and a fresh one is opened, as
httpcore does; a request is never sent twice by the transport itself.
"""

from __future__ import annotations

import http.client
import select
import socket
import threading
import urllib.request
from typing import NoReturn

import httpx

#: Idle connections kept per host and port.
MAX_IDLE = 8
#: Requests in flight at once, each on a connection of its own (httpx's own default limit):
#: more wait for one to finish, for at most the pool timeout (then httpx.PoolTimeout).
MAX_CONNECTIONS = 100


def pool_timeout(limit: int, timeout: float | None) -> httpx.PoolTimeout:
    return httpx.PoolTimeout(f"all {limit} connections stayed busy for {timeout} s")


class StdlibTransport(httpx.BaseTransport):
    """httpx transport for plain HTTP/1.1 with keep-alive, on http.client."""

    def __init__(self, max_connections: int = MAX_CONNECTIONS) -> None:
        self._idle: dict[tuple[str, int], list[http.client.HTTPConnection]] = {}
        self._lock = threading.Lock()
        self._max_connections = max_connections
        self._slots = threading.BoundedSemaphore(max_connections)

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.scheme != "http":
            raise httpx.UnsupportedProtocol(f"{request.url.scheme!r} needs httpx's transport")
        timeout = request.extensions.get("timeout", {})
        if not self._slots.acquire(timeout=timeout.get("pool")):
            raise pool_timeout(self._max_connections, timeout.get("pool"))
        try:
            return self._round_trip(request, timeout)
        finally:
            self._slots.release()

    def _round_trip(
        self, request: httpx.Request, timeout: dict[str, float | None]
    ) -> httpx.Response:
        origin = (request.url.host, request.url.port or 80)
        body = request.read()
        conn = self._checkout(origin, timeout.get("connect"))
        phase = "write"
        try:
            conn.sock.settimeout(timeout.get("write"))
            target = request.url.raw_path.decode("ascii")
            conn.putrequest(request.method, target, skip_host=True, skip_accept_encoding=True)
            for name, value in request_headers(request, body):
                conn.putheader(name, value)
            conn.endheaders(body or None)
            phase = "read"
            conn.sock.settimeout(timeout.get("read"))
            response = conn.getresponse()
            content = response.read()
        except BaseException as exc:
            conn.close()
            raise_mapped(exc, phase)
        if response.will_close:
            conn.close()
        else:
            self._checkin(origin, conn)
        return httpx.Response(
            response.status,
            headers=response.getheaders(),
            stream=httpx.ByteStream(content),
            extensions={"http_version": b"HTTP/1.1", "reason_phrase": response.reason.encode()},
        )

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, {}
        for conns in idle.values():
            for conn in conns:
                conn.close()

    def _checkout(
        self, origin: tuple[str, int], timeout: float | None
    ) -> http.client.HTTPConnection:
        with self._lock:
            pooled = self._idle.get(origin, [])
            while pooled:
                conn = pooled.pop()
                if conn.sock is not None and not readable(conn.sock):
                    return conn
                conn.close()
        conn = http.client.HTTPConnection(origin[0], origin[1], timeout=timeout)
        try:
            conn.connect()
        except BaseException as exc:
            conn.close()
            raise_mapped(exc, "connect")
        conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return conn

    def _checkin(self, origin: tuple[str, int], conn: http.client.HTTPConnection) -> None:
        with self._lock:
            pooled = self._idle.setdefault(origin, [])
            if len(pooled) < MAX_IDLE:
                pooled.append(conn)
                return
        conn.close()


def request_headers(request: httpx.Request, body: bytes) -> list[tuple[bytes, bytes]]:
    """The headers both transports send. The body always goes whole, with its length: httpx
    marks a streamed body `Transfer-Encoding: chunked`, and it has been read into `body`."""
    headers = [(n, v) for n, v in request.headers.raw if n.lower() != b"transfer-encoding"]
    if "content-length" not in request.headers and (
        body or request.method in ("POST", "PUT", "PATCH")
    ):
        headers.append((b"Content-Length", b"%d" % len(body)))
    return headers


def plain_http(transport: object) -> bool:
    """Whether a client's http:// requests go through our transports: not when it was given a
    transport of its own, nor when a proxy is set for http (httpx's transport goes through it)."""
    return transport is None and not {"http", "all"} & set(urllib.request.getproxies())


def readable(sock: socket.socket) -> bool:
    """An idle connection is fit to reuse only if nothing is waiting to be read on it: EOF (the
    server closed it) and stray bytes both make it readable (and a broken socket counts too)."""
    try:
        ready, _, _ = select.select([sock], [], [], 0)
    except (OSError, ValueError):
        return True
    return bool(ready)


def raise_mapped(exc: BaseException, phase: str) -> NoReturn:
    """Raise the httpx error `exc` maps to (chained to it), or `exc` itself if none."""
    error = _mapped_error(exc, phase)
    if error is exc:
        raise exc
    raise error from exc


def _mapped_error(exc: BaseException, phase: str) -> BaseException:
    """The httpx exception a caller of httpx expects for what the socket said while it
    connected, wrote the request or read the response."""
    if not isinstance(exc, Exception):
        return exc  # KeyboardInterrupt and the like go through as they are
    if isinstance(exc, TimeoutError):  # socket.timeout is TimeoutError
        kind = {"connect": httpx.ConnectTimeout, "write": httpx.WriteTimeout}
        return kind.get(phase, httpx.ReadTimeout)(str(exc))
    if phase == "connect" and isinstance(exc, OSError):
        return httpx.ConnectError(str(exc))
    if isinstance(exc, http.client.HTTPException | ConnectionError):
        return httpx.RemoteProtocolError(f"{type(exc).__name__}: {exc}")
    if isinstance(exc, OSError):
        return httpx.WriteError(str(exc)) if phase == "write" else httpx.ReadError(str(exc))
    return exc
