"""Hot engine: requests that need a session's arrays go to the process that owns it.

Direct HTTP forwarding rather than through Redis: the request is already HTTP, and relaying a
multi-MB gradient through Redis (write, read, then the answer back the same way) would put back
on Redis the very traffic the hot engine takes off it. Forwarding costs one loopback or LAN hop,
and with nginx hashing on the session id it is rare. The body is read once (bounded like every
body), the owner's response streams back unchanged (status, headers, bytes).

Which requests: push, params (GET incl. long-poll, PUT), state (GET, PUT), GET, PATCH and DELETE
of a session (a GET renews a session's TTL, which only the owner can do whole). Creating and
listing are served anywhere.
A forwarded request is marked and never forwarded again: the receiver serves it or answers 503.
An owner that does not accept the connection is presumed dead: after its lease lapses this
process takes the session over and serves the request itself. An owner that fails after it got
the request may have applied it: that is a 503 for the client to retry (with its Idempotency-Key).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import httpx

from .problems import problem_response

log = logging.getLogger("optserve.forward")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

FORWARDED = "x-optserve-forwarded"
_OWNED = re.compile(r"^/v1/sessions/([^/]+)(/params|/gradients|/state)?$")
_HOP_BY_HOP = {
    b"host", b"connection", b"keep-alive", b"transfer-encoding", b"te", b"upgrade",
    b"proxy-connection", b"content-length", FORWARDED.encode(),
}  # fmt: skip


def _needs_owner(scope: Scope) -> str | None:
    """The session id if this request must run where the session is hot."""
    match = _OWNED.match(scope["path"])
    if match is None:
        return None
    if match.group(2) is None and scope["method"] not in ("GET", "PATCH", "DELETE"):
        return None
    return match.group(1)


class ForwardToOwner:
    """ASGI middleware: run here if this process owns the session, else relay to the owner."""

    def __init__(self, app: Callable, *, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        sid = _needs_owner(scope) if scope["type"] == "http" else None
        service = getattr(scope["app"].state, "service", None) if sid else None
        if sid is None or service is None:
            return await self.app(scope, receive, send)
        forwarded = any(name == FORWARDED.encode() for name, _ in scope["headers"])
        try:
            url = await service.route(sid, forwarded=forwarded)
        except Exception:  # 404, store down: the route itself answers that from the service
            url = None
        if url is None:
            return await self.app(scope, receive, send)
        body = await _read_body(receive, self.max_body_bytes)
        if body is None:
            await _send(send, problem_response("payload_too_large", "the body is too large"))
            return
        for _ in range(3):
            try:
                await self._relay(scope, url, service.owner_id, body, send)
                return
            except httpx.ConnectError:
                log.info("owner of %s at %s does not answer: taking over", sid, url)
                try:
                    url = await service.route(sid, dead_url=url)
                except Exception:
                    url = None
            except httpx.HTTPError as error:  # it had the request: it may have applied it
                await _send(
                    send,
                    problem_response(
                        "owner_unavailable",
                        f"the session's owner failed while serving the request ({error!r}); "
                        "retry (with the same Idempotency-Key for a push)",
                        {"Retry-After": "1"},
                    ),
                )
                return
            if url is None:
                break
        await self.app(scope, _replay(body, receive), send)

    async def _relay(self, scope: Scope, url: str, me: str, body: bytes, send: Send) -> None:
        client: httpx.AsyncClient = scope["app"].state.forward_client
        path = scope.get("raw_path") or scope["path"].encode()
        target = url + path.decode("latin-1")
        if scope.get("query_string"):
            target += "?" + scope["query_string"].decode("latin-1")
        headers = [(k, v) for k, v in scope["headers"] if k.lower() not in _HOP_BY_HOP]
        headers.append((FORWARDED.encode(), me.encode()))
        request = client.build_request(scope["method"], target, headers=headers, content=body)
        response = await client.send(request, stream=True)
        try:
            await send(
                {
                    "type": "http.response.start",
                    "status": response.status_code,
                    "headers": [
                        (k, v)
                        for k, v in response.headers.raw
                        if k.lower() not in _HOP_BY_HOP or k.lower() == b"content-length"
                    ],
                }
            )
            async for chunk in response.aiter_raw():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            await response.aclose()


async def _read_body(receive: Receive, limit: int) -> bytes | None:
    parts: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        parts.append(chunk)
        if not message.get("more_body", False):
            break
    return b"".join(parts)


def _replay(body: bytes, receive_more: Receive) -> Receive:
    """A receive() that hands the app the body this middleware already read, then passes on
    what the connection says next (a disconnect)."""
    sent = False

    async def receive() -> Message:
        nonlocal sent
        if sent:
            return await receive_more()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return receive


async def _send(send: Send, response: Any) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": response.status_code,
            "headers": response.raw_headers,
        }
    )
    await send({"type": "http.response.body", "body": response.body})
