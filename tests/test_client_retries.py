"""Retries, idempotency keys, base_version and the async client, against real servers.

Failures are real: a TCP proxy (below) between client and a real `optserve serve` drops
connections after the server has answered, or is not listening yet; a real Valkey is stopped
under a real server to get its 503. Nothing imitates the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import BinaryIO, Literal
from urllib.parse import urlsplit

import anyio
import httpx
import numpy as np
import pytest

from optserve.store.embedded import EmbeddedValkey
from optserve_client import (
    AsyncClient,
    AsyncSession,
    Client,
    OptservError,
    RetryPolicy,
)
from optserve_client._base import retry_after_seconds

from .conftest import free_port

pytestmark = pytest.mark.anyio

#: Quick retries so the tests stay short; the decisions are the same as with the defaults.
FAST = RetryPolicy(attempts=4, backoff=0.02, max_backoff=0.1)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype == np.float32 and a.shape == b.shape and a.tobytes() == b.tobytes()


# SGD values whose every product and sum is exact in float32, so "p0 - lr * g" is the one right
# answer however the server orders or fuses its float operations.
P0 = np.array([1.0, 2.0, -3.0, 0.5], np.float32)
G = np.array([0.5, -1.0, 2.0, 0.25], np.float32)
LR = 0.5


def one_step(p: np.ndarray, g: np.ndarray, lr: float = LR) -> np.ndarray:
    return (p - np.float32(lr) * g).astype(np.float32)


def direct_pull(api_url: str, sid: str) -> tuple[int, np.ndarray]:
    """Version and `w` straight from the server, past any proxy."""
    with Client(api_url, retries=0) as client:
        session = client.session(sid)
        w = session.pull()["w"]
        return session.version, w


# -- a TCP proxy that knows just enough HTTP/1.1 to count requests and lose answers --------------


@dataclass(frozen=True)
class Seen:
    method: str
    path: str
    headers: dict[str, str]  # lower-cased names
    body: bytes


Drop = Literal["close", "reset"]


def _read_head(stream: BinaryIO) -> list[bytes] | None:
    """Start line and header lines of one message; None at a clean end of the connection."""
    lines: list[bytes] = []
    while True:
        line = stream.readline(65536)
        if not line:
            if lines:
                raise ConnectionError("connection closed inside a message head")
            return None
        if line in (b"\r\n", b"\n"):
            if lines:
                return lines
            continue
        lines.append(line)


def _headers(lines: list[bytes]) -> dict[str, str]:
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    return headers


def _read_body(stream: BinaryIO, headers: dict[str, str]) -> bytes:
    """A body by Content-Length or chunked encoding (returned raw, as it came)."""
    if "chunked" in headers.get("transfer-encoding", "").lower():
        raw = b""
        while True:
            size_line = stream.readline()
            raw += size_line
            size = int(size_line.split(b";")[0], 16)
            chunk = stream.read(size + 2)
            raw += chunk
            if size == 0:
                return raw  # no trailers from uvicorn
    length = int(headers.get("content-length", "0"))
    body = stream.read(length)
    if len(body) != length:
        raise ConnectionError("connection closed inside a body")
    return body


class Proxy:
    """Forwards 127.0.0.1:port to an upstream server, one upstream connection per client one.

    Records every request (`requests`). `drop_response(match, how)` makes the next request that
    matches be forwarded in full and answered by the server in full, after which the proxy
    closes (or resets) the client's connection without relaying the answer: the server acted,
    the client never heard. `start()` may come later than construction, so the port refuses
    connections until then.
    """

    def __init__(self, upstream_url: str, port: int | None = None) -> None:
        parts = urlsplit(upstream_url)
        self.upstream = (parts.hostname or "127.0.0.1", parts.port or 80)
        self.port = port if port is not None else free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.requests: list[Seen] = []
        self._drops: list[tuple[Callable[[Seen], bool], Drop]] = []
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._sockets: set[socket.socket] = set()

    def drop_response(self, match: Callable[[Seen], bool], how: Drop = "close") -> None:
        with self._lock:
            self._drops.append((match, how))

    def seen(self, method: str, suffix: str = "") -> list[Seen]:
        with self._lock:
            return [s for s in self.requests if s.method == method and s.path.endswith(suffix)]

    def start(self) -> Proxy:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def close(self) -> None:
        if self._listener is not None:
            self._listener.close()
        with self._lock:
            sockets, self._sockets = list(self._sockets), set()
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def _accept(self) -> None:
        assert self._listener is not None
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _take_drop(self, seen: Seen) -> Drop | None:
        for index, (match, how) in enumerate(self._drops):
            if match(seen):
                del self._drops[index]
                return how
        return None

    def _serve(self, client: socket.socket) -> None:
        upstream = socket.create_connection(self.upstream)
        with self._lock:
            self._sockets.update((client, upstream))
        from_client, from_upstream = client.makefile("rb"), upstream.makefile("rb")
        try:
            while True:
                head = _read_head(from_client)
                if head is None:
                    return
                headers = _headers(head)
                body = _read_body(from_client, headers)
                method, target, _ = head[0].decode("latin-1").split(" ", 2)
                seen = Seen(method, urlsplit(target).path, headers, body)
                with self._lock:
                    self.requests.append(seen)
                    drop = self._take_drop(seen)
                upstream.sendall(b"".join(head) + b"\r\n" + body)
                answer_head = _read_head(from_upstream)
                if answer_head is None:
                    return
                answer_headers = _headers(answer_head)
                status = int(answer_head[0].split()[1])
                bodiless = method == "HEAD" or status in (204, 304) or status < 200
                answer_body = b"" if bodiless else _read_body(from_upstream, answer_headers)
                if drop is not None:  # the server answered in full; the client gets nothing
                    if drop == "reset":
                        linger = struct.pack("ii", 1, 0)
                        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
                    else:
                        client.shutdown(socket.SHUT_RDWR)
                    return
                client.sendall(b"".join(answer_head) + b"\r\n" + answer_body)
        except (OSError, ValueError):
            return
        finally:
            for stream in (from_client, from_upstream):
                stream.close()
            for sock in (client, upstream):
                sock.close()
            with self._lock:
                self._sockets.difference_update((client, upstream))


@pytest.fixture
def proxy(api_url: str) -> Iterator[Proxy]:
    started = Proxy(api_url).start()
    try:
        yield started
    finally:
        started.close()


def is_push(seen: Seen) -> bool:
    return seen.method == "POST" and seen.path.endswith("/gradients")


# -- a lost answer: retried with the same key, applied once ---------------------------------------


@pytest.mark.parametrize("how", ["close", "reset"])
def test_lost_push_answer_is_retried_with_the_same_key_and_applied_once(
    api_url: str, proxy: Proxy, how: Drop
) -> None:
    proxy.drop_response(is_push, how)
    with Client(proxy.url, retries=FAST) as client:
        session = client.create_session("sgd", {"w": P0}, lr=LR)
        params = session.push({"w": G})
    pushes = proxy.seen("POST", "/gradients")
    assert len(pushes) == 2
    keys = {seen.headers.get("idempotency-key") for seen in pushes}
    assert len(keys) == 1 and None not in keys and "" not in keys
    assert pushes[0].body == pushes[1].body  # the same request, so the server replays it
    result = session.last_push
    assert result is not None
    assert result.replayed and result.applied and result.version == 1
    assert result.idempotency_key in keys
    assert session.version == 1
    expected = one_step(P0, G)
    assert same_bits(params["w"], expected)
    version, w = direct_pull(api_url, session.id)
    assert version == 1 and same_bits(w, expected)


async def test_async_lost_push_answer_is_applied_once(api_url: str, proxy: Proxy) -> None:
    proxy.drop_response(is_push)
    async with AsyncClient(proxy.url, retries=FAST) as client:
        session = await client.create_session("sgd", {"w": P0}, lr=LR)
        params = await session.push({"w": G})
    pushes = proxy.seen("POST", "/gradients")
    assert len(pushes) == 2
    assert pushes[0].headers["idempotency-key"] == pushes[1].headers["idempotency-key"]
    assert session.last_push is not None and session.last_push.replayed
    assert session.version == 1 and same_bits(params["w"], one_step(P0, G))
    assert direct_pull(api_url, session.id)[0] == 1


def test_every_push_has_its_own_key(proxy: Proxy) -> None:
    with Client(proxy.url, retries=FAST) as client:
        session = client.create_session("sgd", {"w": P0}, lr=LR)
        session.push({"w": G})
        session.push({"w": G})
        # A key of one's own, reused by a later call: the body must be the same, base_version
        # included (the default one moved on to 3), or the server refuses the key.
        session.push({"w": G}, idempotency_key="mine-1", base_version=2)
        session.push({"w": G}, idempotency_key="mine-1", base_version=2)  # a replay
        assert session.last_push is not None and session.last_push.replayed
        with pytest.raises(OptservError) as caught:
            session.push({"w": G}, idempotency_key="mine-1")
        assert caught.value.code == "idempotency_key_reused"
    keys = [seen.headers["idempotency-key"] for seen in proxy.seen("POST", "/gradients")]
    assert len(keys) == 5 and len(set(keys[:2])) == 2 and set(keys[2:]) == {"mine-1"}
    assert session.version == 3  # the replayed fourth push applied nothing


def test_a_replay_does_not_move_the_handle_back(api_url: str) -> None:
    """A replay answers with the first attempt's (older) version: the handle keeps the newest."""
    with Client(api_url, retries=FAST) as client:
        session = client.create_session("sgd", {"w": P0}, lr=LR)
        session.push({"w": G}, idempotency_key="first", base_version=0)
        client.session(session.id).push({"w": G})
        session.pull()
        assert session.version == 2
        session.push({"w": G}, idempotency_key="first", base_version=0)
        assert session.last_push is not None and session.last_push.replayed
        assert session.last_push.version == 1 and session.version == 2
        assert same_bits(session.last_push.params["w"], one_step(one_step(P0, G), G))


def test_lost_delete_answer_counts_as_deleted(proxy: Proxy) -> None:
    proxy.drop_response(lambda seen: seen.method == "DELETE")
    with Client(proxy.url, retries=FAST) as client:
        session = client.create_session("sgd", {"w": P0}, lr=LR)
        session.delete()  # the retry's 404 means the lost attempt deleted it
        assert len(proxy.seen("DELETE")) == 2
        with pytest.raises(OptservError) as caught:
            session.delete()  # a first attempt's 404 is an error as always
        assert caught.value.code == "session_not_found" and caught.value.attempts == 1
    assert len(proxy.seen("DELETE")) == 3


def test_create_is_not_resent_once_it_may_have_arrived(api_url: str, proxy: Proxy) -> None:
    proxy.drop_response(lambda seen: seen.method == "POST" and seen.path == "/v1/sessions")
    with Client(proxy.url, retries=FAST) as client, pytest.raises(OptservError) as caught:
        client.create_session("sgd", {"w": P0}, lr=LR, name="maybe-made")
    assert caught.value.code == "transport_error" and caught.value.attempts == 1
    assert len(proxy.seen("POST", "/v1/sessions")) == 1  # the server did make it: no second one
    with Client(api_url) as client:
        assert sum(s["name"] == "maybe-made" for s in client.list_sessions()) == 1


# -- nothing listening yet: connection refused, then success --------------------------------------


def test_connection_refused_is_retried_until_the_server_listens(api_url: str) -> None:
    late = Proxy(api_url)  # its port refuses connections until start()
    policy = RetryPolicy(attempts=40, backoff=0.02, max_backoff=0.05, jitter=0)
    starter = threading.Timer(0.5, late.start)
    starter.start()
    try:
        with Client(late.url, retries=policy) as client:
            started = time.monotonic()
            # create_session too: a refused connection never reached the server, so it retries
            session = client.create_session("sgd", {"w": P0}, lr=LR)
            assert time.monotonic() - started >= 0.4
            assert same_bits(session.push({"w": G})["w"], one_step(P0, G))
    finally:
        starter.join()
        late.close()
    assert len(late.seen("POST", "/v1/sessions")) == 1
    assert len(late.seen("POST", "/gradients")) == 1


async def test_async_connection_refused_is_retried(api_url: str) -> None:
    late = Proxy(api_url)
    policy = RetryPolicy(attempts=40, backoff=0.02, max_backoff=0.05, jitter=0)
    starter = threading.Timer(0.3, late.start)
    starter.start()
    try:
        async with AsyncClient(late.url, retries=policy) as client:
            assert isinstance(await client.list_sessions(limit=1), list)
    finally:
        starter.join()
        late.close()


# -- what is never retried -------------------------------------------------------------------------


def test_no_retry_on_client_errors(proxy: Proxy) -> None:
    with Client(proxy.url, retries=FAST) as client:
        session = client.create_session("sgd", {"w": P0}, lr=LR, max_staleness=0)
        cases: list[tuple[Callable[[], object], int, str, str, str]] = [
            (lambda: session.push({"nope": G}), 422, "unknown_tensor", "POST", "/gradients"),
            (lambda: session.push({"w": G}, base_version=5), 422, "invalid_session", "POST",
             "/gradients"),
            (lambda: session.put_params({"w": P0}, if_match=9), 412, "precondition_failed", "PUT",
             "/params"),
            (lambda: client.session("no-such-session"), 404, "session_not_found", "GET",
             "/no-such-session"),
            (lambda: client.create_session("adamx", {"w": P0}), 422, "unknown_optimizer", "POST",
             "/v1/sessions"),
        ]  # fmt: skip
        for call, status, code, method, suffix in cases:
            before = len(proxy.seen(method, suffix))
            with pytest.raises(OptservError) as caught:
                call()
            assert (caught.value.status, caught.value.code) == (status, code)
            assert caught.value.attempts == 1
            assert len(proxy.seen(method, suffix)) == before + 1, code


@pytest.mark.parametrize("retries", [0, None, RetryPolicy(attempts=1)])
def test_retries_can_be_turned_off(proxy: Proxy, retries: RetryPolicy | int | None) -> None:
    proxy.drop_response(is_push)
    with Client(proxy.url, retries=retries) as client:
        session = client.create_session("sgd", {"w": P0}, lr=LR)
        with pytest.raises(OptservError) as caught:
            session.push({"w": G})
        assert caught.value.code == "transport_error" and caught.value.attempts == 1
        assert len(proxy.seen("POST", "/gradients")) == 1
        assert session.info()["version"] == 1  # it was applied; the answer was lost
    with (
        Client(f"http://127.0.0.1:{free_port()}", retries=retries) as client,
        pytest.raises(OptservError) as refused,
    ):
        client.list_sessions()
    assert refused.value.code == "transport_error" and refused.value.attempts == 1


def test_retries_give_up_after_the_policy_attempts() -> None:
    policy = RetryPolicy(attempts=3, backoff=0.01, max_backoff=0.01)
    with (
        Client(f"http://127.0.0.1:{free_port()}", retries=policy) as client,
        pytest.raises(OptservError) as caught,
    ):
        client.list_sessions()
    assert caught.value.code == "transport_error" and caught.value.attempts == 3


def test_retry_policy_delays() -> None:
    policy = RetryPolicy(attempts=10, backoff=0.1, max_backoff=1.0, jitter=0)
    assert [policy.delay(n) for n in range(1, 6)] == [0.1, 0.2, 0.4, 0.8, 1.0]
    assert policy.delay(1, retry_after=0.5) == 0.5  # Retry-After is a floor ...
    assert policy.delay(1, retry_after=30) == 1.0  # ... capped by max_backoff
    assert policy.delay(4, retry_after=0.1) == 0.8
    jittered = RetryPolicy(backoff=1.0, max_backoff=1.0, jitter=0.5)
    assert all(0.5 <= jittered.delay(1) <= 1.0 for _ in range(100))
    assert RetryPolicy.of(3).attempts == 4 and RetryPolicy.of(None).attempts == 1
    for bad in ({"attempts": 0}, {"jitter": 2.0}, {"backoff": -1.0}):
        with pytest.raises(ValueError):
            RetryPolicy(**bad)  # type: ignore[arg-type]

    def retry_after(value: str) -> float | None:
        return retry_after_seconds(httpx.Response(503, headers={"Retry-After": value}))

    assert retry_after("3") == 3.0 and retry_after("soon") is None
    in_two_s = format_datetime(datetime.now(UTC) + timedelta(seconds=2), usegmt=True)
    assert 0.5 <= (retry_after(in_two_s) or 0.0) <= 2.0
    assert retry_after_seconds(httpx.Response(503)) is None


# -- 503 while the store is down ------------------------------------------------------------------


def test_push_retries_through_503_until_the_store_is_back(tmp_path, server_factory) -> None:
    store_dir = tmp_path / "store"
    store_dir.mkdir()
    store = EmbeddedValkey(store_dir, port=free_port())
    store.start()
    try:
        server = server_factory(OPTSERVE_REDIS_URL=store.url)
        proxy = Proxy(server.url).start()
        try:
            run_503_scenario(store, server.url, proxy)
        finally:
            proxy.close()
    finally:
        store.stop()


def run_503_scenario(store: EmbeddedValkey, server_url: str, proxy: Proxy) -> None:
    policy = RetryPolicy(attempts=60, backoff=0.05, max_backoff=0.1)
    with Client(proxy.url, retries=policy) as client:
        session = client.create_session("sgd", {"w": P0}, lr=LR)
        store.stop()

        # create_session is not retried on a 503: the store may have failed after the write
        with pytest.raises(OptservError) as caught:
            client.create_session("sgd", {"w": P0}, lr=LR)
        assert (caught.value.status, caught.value.code) == (503, "store_unavailable")
        assert caught.value.attempts == 1

        outcome: dict[str, object] = {}
        done = threading.Event()

        def push() -> None:
            try:
                outcome["params"] = session.push({"w": G})
            except BaseException as exc:  # reported by the main thread
                outcome["error"] = exc
            finally:
                done.set()

        pusher = threading.Thread(target=push)
        pusher.start()
        time.sleep(1.0)
        assert not done.is_set(), outcome  # still retrying while the store is down
        store.start()
        pusher.join(timeout=20)
    assert "error" not in outcome, outcome.get("error")
    attempts = proxy.seen("POST", "/gradients")
    assert len(attempts) >= 3
    assert len({seen.headers["idempotency-key"] for seen in attempts}) == 1
    assert session.version == 1 and session.last_push is not None
    assert session.last_push.version == 1 and not session.last_push.replayed
    expected = one_step(P0, G)
    assert same_bits(outcome["params"]["w"], expected)  # type: ignore[index]
    version, w = direct_pull(server_url, session.id)
    assert version == 1 and same_bits(w, expected)


# -- base_version, sent by default ----------------------------------------------------------------


def test_base_version_is_the_last_version_seen(proxy: Proxy) -> None:
    with Client(proxy.url, retries=FAST) as client:
        mine = client.create_session("sgd", {"w": P0}, lr=LR, max_staleness=0)
        other = client.session(mine.id)
        assert mine.pull() is not None and mine.version == 0
        other.push({"w": G})  # the session moves on to version 1 behind mine's back
        assert other.last_push is not None and other.last_push.staleness == 0

        with pytest.raises(OptservError) as caught:
            mine.push({"w": G})
        error = caught.value
        assert (error.status, error.code) == (409, "stale_gradient")
        assert error.problem["version"] == 1 and error.attempts == 1
        assert mine.version == 0  # a refusal is not a version this handle has seen params of

        mine.pull()
        assert mine.version == 1
        mine.push({"w": G})
        assert mine.version == 2 and mine.last_push is not None
        assert mine.last_push.staleness == 0

        # Explicit values win; None sends none, so no staleness check applies.
        other.push({"w": G}, base_version=None)
        assert other.last_push is not None and other.last_push.staleness is None
        assert other.version == 3
        with pytest.raises(OptservError) as caught:
            other.push({"w": G}, base_version=2)
        assert caught.value.code == "stale_gradient"
        with pytest.raises(ValueError):
            other.push({"w": G}, base_version=-1)

        scaled = client.create_session("sgd", {"w": P0}, lr=LR, max_staleness=0)
        info = scaled.update(staleness="scale", max_staleness=0)
        assert (info["staleness"], info["max_staleness"]) == ("scale", 0)
        client.session(scaled.id).push({"w": G})
        stale = scaled.push({"w": G})  # base 0 at version 1: applied with lr / 2
        assert scaled.last_push is not None and scaled.last_push.staleness == 1
        assert same_bits(stale["w"], one_step(one_step(P0, G), G, LR / 2))
    sent = [seen.body for seen in proxy.seen("POST", "/gradients")]
    assert b"base_version" in sent[0]


# -- the async client: the main flows -------------------------------------------------------------


@pytest.fixture(params=["safetensors", "json"])
async def aclient(request: pytest.FixtureRequest, api_url: str):
    async with AsyncClient(api_url, codec=request.param) as client:
        yield client


async def test_async_create_push_pull_update_delete(aclient: AsyncClient, api_url: str) -> None:
    rng = np.random.default_rng(7)
    w = rng.standard_normal((3, 4)).astype(np.float32)
    session = await aclient.create_session(
        "adam", {"w": w}, tensors={"b": 4}, name="async", lr=0.01
    )
    assert isinstance(session, AsyncSession) and session.version == 0
    with Client(api_url) as sync_client:  # the sync client on a twin session is the oracle
        twin = sync_client.create_session("adam", {"w": w}, tensors={"b": 4}, lr=0.01)
        for _ in range(3):
            grads = {"w": rng.standard_normal((3, 4)).astype(np.float32)}
            got = await session.push(grads, worker="async-worker")
            want = twin.push(grads)
            assert set(got) == set(want) and all(same_bits(got[n], want[n]) for n in got)
            assert session.last_push is not None and twin.last_push is not None
            assert session.last_push.total_norm == twin.last_push.total_norm
        assert session.version == 3 == twin.version
        pulled = await session.pull("w")
        assert set(pulled) == {"w"} and same_bits(pulled["w"], twin.pull("w")["w"])
    info = await session.info()
    assert info["version"] == 3 and info["name"] == "async"
    assert (await session.update(lr=0.5))["optimizer"]["lr"] == 0.5
    assert session.id in {s["id"] for s in await aclient.list_sessions()}
    assert (await aclient.session(session.id)).version == 3
    assert await session.push({"w": w}, returning="none") == {}
    await session.delete()
    with pytest.raises(OptservError) as caught:
        await session.info()
    assert caught.value.code == "session_not_found"


async def test_async_long_poll(aclient: AsyncClient) -> None:
    session = await aclient.create_session("sgd", {"w": P0}, lr=LR)
    started = time.monotonic()
    assert same_bits((await session.pull(wait_s=0.2))["w"], P0)  # 304, then a plain pull
    assert time.monotonic() - started >= 0.15 and session.version == 0

    other = await aclient.session(session.id)

    async def push_later() -> None:
        await anyio.sleep(0.2)
        await other.push({"w": G})

    async with anyio.create_task_group() as tasks:
        tasks.start_soon(push_later)
        started = time.monotonic()
        params = await session.pull(wait_s=10)
        elapsed = time.monotonic() - started
    assert elapsed < 5 and session.version == 1
    assert same_bits(params["w"], one_step(P0, G))


async def test_async_state_round_trip_and_if_match(aclient: AsyncClient) -> None:
    source = await aclient.create_session("adam", {"w": P0}, lr=0.01)
    for _ in range(2):
        await source.push({"w": G})
    document = await source.state()
    assert document["version"] == 2 and document["tensors"]["w"]["step"] == 2.0
    target = await aclient.create_session("adam", tensors={"w": P0.shape}, lr=0.3)
    assert await target.load_state(document) == 1 == target.version
    assert same_bits((await target.pull())["w"], (await source.pull())["w"])
    got, want = await target.push({"w": G}), await source.push({"w": G})
    assert same_bits(got["w"], want["w"])
    with pytest.raises(OptservError) as caught:
        await target.load_state(document, if_match=0)
    assert (caught.value.status, caught.value.code) == (412, "precondition_failed")
    assert await target.put_params({"w": P0}, if_match=target.version) == 3


async def test_async_errors(aclient: AsyncClient) -> None:
    with pytest.raises(OptservError) as caught:
        await aclient.session("no-such-session")
    assert (caught.value.status, caught.value.code) == (404, "session_not_found")
    with pytest.raises(OptservError) as caught:
        await aclient.create_session("adam", {"w": P0}, lr=-1.0)
    assert caught.value.code == "invalid_hyperparameter"
    session = await aclient.create_session("sgd", {"w": P0}, lr=LR)
    with pytest.raises(OptservError) as caught:
        await session.push({"w": np.zeros(3, np.float32)})
    assert (caught.value.status, caught.value.code) == (422, "shape_mismatch")
    async with AsyncClient(f"http://127.0.0.1:{free_port()}", retries=0) as dead:
        with pytest.raises(OptservError) as caught:
            await dead.list_sessions()
        assert caught.value.status is None and caught.value.code == "transport_error"


async def test_async_concurrent_pushes_into_one_session(api_url: str) -> None:
    """8 pushes in flight at once on one handle: 8 steps, none lost, the exact SGD sum."""
    p0 = np.array([100.0, -50.0, 0.0], np.float32)
    grads = [np.array([k, 2 * k, -k], np.float32) for k in range(1, 9)]
    async with AsyncClient(api_url) as client:
        session = await client.create_session("sgd", {"w": p0}, lr=0.25)
        await asyncio.gather(*(session.push({"w": g}, base_version=None) for g in grads))
        assert session.version == 8  # answers arrive in any order; the newest is kept
        final = await session.pull()
    expected = (p0 - np.float32(0.25) * np.sum(grads, axis=0)).astype(np.float32)
    assert same_bits(final["w"], expected)
