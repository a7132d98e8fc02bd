"""Every request gets an id (the client's sane `X-Request-ID`, else a new one), returned as
`X-Request-ID` on every response, errors included, and one access log line when it ends.

A plain ASGI middleware, not Starlette's BaseHTTPMiddleware: that one runs the app in another
task (context variables set inside would not come back) and buffers streamed bodies. Added last,
it is the outermost user middleware, so CORS answers carry the header too. An exception no
handler took becomes the 500 problem here, where the request id is still known, and is logged
with its traceback and that id.
"""

from __future__ import annotations

import logging
import re
import time
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .. import logs
from .problems import count_refused_push, problem_response

HEADER = "X-Request-ID"
#: A client's id is kept if it is 1-128 characters of these (no spaces, quotes or controls that
#: could forge a log line or a header); otherwise it is replaced by a new one.
SANE_ID = re.compile(r"[A-Za-z0-9._:/+=@~-]{1,128}")

access_log = logging.getLogger("optserve.access")
log = logging.getLogger("optserve.api")


def incoming_id(scope: Scope) -> str | None:
    for name, value in scope.get("headers", ()):
        if name == b"x-request-id":
            text = value.decode("latin-1")
            return text if SANE_ID.fullmatch(text) else None
    return None


class RequestLogMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = incoming_id(scope) or uuid.uuid4().hex
        token = logs.request_id.set(rid)
        header = (b"x-request-id", rid.encode())
        start = time.perf_counter()
        status: int | None = None

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {**message, "headers": [*message.get("headers", ()), header]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            log.exception("unhandled error in %s %s", scope["method"], scope["path"])
            if status is not None:
                raise  # the response is already under way: let the server cut the connection
            count_refused_push(scope, "internal_error")
            response = problem_response("internal_error", "an unexpected error occurred")
            await response(scope, receive, send_with_id)
        finally:
            elapsed_ms = round((time.perf_counter() - start) * 1000, 3)
            access_log.info(
                "%s %s %s %.1fms",
                scope["method"],
                scope["path"],
                status,
                elapsed_ms,
                extra={
                    "method": scope["method"],
                    "path": scope["path"],
                    "status": status,
                    "duration_ms": elapsed_ms,
                },
            )
            logs.request_id.reset(token)
