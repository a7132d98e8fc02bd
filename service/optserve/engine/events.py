"""Version events for long-poll: the commit script PUBLISHes each new version, and one pattern
subscription per process wakes the waiters of that session.

Pub/sub rather than keyspace notifications (they need server configuration we may not own) or a
blocking list (it would need a list per waiter and cleanup): a waiter reads the version once,
then sleeps until a message for its session arrives or its deadline passes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster

from ..store import keys
from ..store.cluster import open_pubsub

log = logging.getLogger("optserve.events")

#: Longest pause between reconnect attempts while the store is down: a store that comes back
#: has its long-poll wake-ups again within about this long (each attempt is one cheap connect).
RECONNECT_MAX_S = 1.0


def _sid_of(channel: bytes | str) -> str | None:
    text = channel.decode() if isinstance(channel, bytes) else channel
    start, end = text.find("{"), text.find("}")
    return text[start + 1 : end] if 0 <= start < end else None


class VersionEvents:
    """Wakes in-process waiters when a session's version changes, on any replica."""

    def __init__(self, client: aioredis.Redis | RedisCluster) -> None:
        self._client = client
        self._waiters: dict[str, set[asyncio.Event]] = {}
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._listen(), name="optserve-version-events")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    @contextlib.contextmanager
    def watch(self, sid: str, event: asyncio.Event) -> Iterator[None]:
        """While inside, `event` is set on every new version of `sid`."""
        self._waiters.setdefault(sid, set()).add(event)
        try:
            yield
        finally:
            waiters = self._waiters.get(sid)
            if waiters is not None:
                waiters.discard(event)
                if not waiters:
                    del self._waiters[sid]

    def _wake_all(self) -> None:
        """After a reconnect a message may have been missed: let every waiter re-read."""
        for waiters in self._waiters.values():
            for event in waiters:
                event.set()

    async def _listen(self) -> None:
        delay = 0.1
        while True:
            pubsub = None
            try:
                pubsub = await open_pubsub(self._client)
                await pubsub.psubscribe(keys.EVENTS_PATTERN)
                self._wake_all()
                delay = 0.1
                async for message in pubsub.listen():
                    if message.get("type") != "pmessage":
                        continue
                    sid = _sid_of(message["channel"])
                    for event in self._waiters.get(sid, ()):
                        event.set()
            except asyncio.CancelledError:
                raise
            except Exception as error:
                log.debug("version events: %s; reconnecting in %.1fs", error, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, RECONNECT_MAX_S)
            finally:
                if pubsub is not None:
                    with contextlib.suppress(Exception):
                        await pubsub.aclose()
