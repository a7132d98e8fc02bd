"""Run the app under uvicorn: JSON logs, and a graceful shutdown on SIGTERM or SIGINT.

uvicorn itself stops accepting, lets the requests in flight finish (up to
timeout_graceful_shutdown), then runs the app's lifespan shutdown (which drains the appliers).
Added here: the app hears when that begins, so long-polls answer at once instead of holding the
exit for up to a minute, and a shutdown that was asked for exits 0.
"""

from __future__ import annotations

import logging
import signal
import socket
from collections.abc import Callable
from types import FrameType

import uvicorn
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .app import create_app, release_long_polls
from .config import Settings
from .logs import logging_config
from .memory import keep_freed_buffers
from .store.errors import StartupRefused


class GracefulServer(uvicorn.Server):
    """uvicorn's server, calling `on_shutdown` as its graceful shutdown begins."""

    def __init__(self, config: uvicorn.Config, on_shutdown: Callable[[], None]) -> None:
        super().__init__(config)
        self.on_shutdown = on_shutdown

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self.on_shutdown()
        await super().shutdown(sockets)


class QuietRefusal:
    """ASGI wrapper: a startup the settings forbid (StartupRefused) ends with its message, which
    says what to change, in place of the traceback Starlette hands uvicorn; any other startup
    failure keeps its traceback."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan":
            return await self.app(scope, receive, send)
        held: list[Message] = []

        async def hold_failure(message: Message) -> None:
            if message["type"] == "lifespan.startup.failed":
                held.append(message)  # sent below, unless it was a refusal
            else:
                await send(message)

        try:
            await self.app(scope, receive, hold_failure)
        except StartupRefused as refusal:
            await send({"type": "lifespan.startup.failed", "message": f"not starting: {refusal}"})
            return
        except BaseException:
            if held:
                await send(held[0])
            raise
        if held:
            await send(held[0])


def _exit_cleanly(signum: int, frame: FrameType | None) -> None:
    """After its graceful shutdown uvicorn raises the signal again, for the previous handler:
    this one, so a shutdown asked for exits 0 (not killed by SIGTERM, no KeyboardInterrupt)."""
    raise SystemExit(0)


def run(settings: Settings) -> None:
    keep_freed_buffers()
    app = create_app(settings)
    config = uvicorn.Config(
        QuietRefusal(app),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        log_config=logging_config(settings.log_level, settings.log_format),
        access_log=False,  # the app logs one line per request itself, with its request id
        timeout_graceful_shutdown=settings.shutdown_timeout_s,
    )
    logging.captureWarnings(True)  # Python warnings become log lines too, not raw stderr text
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, _exit_cleanly)
    GracefulServer(config, lambda: release_long_polls(app)).run()
