"""Group commit: one drain task per session per process takes everything queued and applies it
as one batch (one state load, one commit), so many workers on one session cost one Redis round
trip per batch instead of one per push (DESIGN.md, Engine)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

from ..store.errors import StoreUnavailable

Item = TypeVar("Item")
Result = TypeVar("Result")

#: apply(sid, items) -> one result or exception per item, in order.
ApplyBatch = Callable[[str, Sequence[Item]], Awaitable[Sequence[Result | BaseException]]]


class Batcher(Generic[Item, Result]):
    """Per-session queues; callers await their own item's result.

    With `group=False` the drain takes one item at a time: the same path, for comparison
    (OPTSERVE_GROUP_COMMIT=false, measured in bench/concurrency_bench.py).
    """

    def __init__(self, apply: ApplyBatch, *, group: bool = True, max_batch: int = 256) -> None:
        self._apply = apply
        self._group = group
        self._max_batch = max_batch
        self._queues: dict[str, list[tuple[Item, asyncio.Future]]] = {}
        self._tasks: set[asyncio.Task] = set()
        self._closed = False

    async def submit(self, sid: str, item: Item) -> Result:
        if self._closed:  # only after the server stopped taking requests: a retry goes elsewhere
            raise StoreUnavailable("the server is shutting down")
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        queue = self._queues.get(sid)
        if queue is None:
            self._queues[sid] = [(item, future)]
            task = asyncio.create_task(self._drain(sid), name=f"optserve-apply-{sid}")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        else:
            queue.append((item, future))
        return await future

    async def _drain(self, sid: str) -> None:
        queue = self._queues[sid]
        try:
            while queue:
                size = min(len(queue), self._max_batch) if self._group else 1
                batch = queue[:size]
                del queue[:size]
                try:
                    results = await self._apply(sid, [item for item, _ in batch])
                except Exception as error:
                    results = [error] * len(batch)
                except asyncio.CancelledError:  # close() gave up on it: its callers hear so
                    for _, future in batch:
                        future.cancel()
                    raise
                for (_, future), result in zip(batch, results, strict=True):
                    if future.done():  # the caller went away; its push may still have applied
                        continue
                    if isinstance(result, BaseException):
                        future.set_exception(result)
                    else:
                        future.set_result(result)
        finally:
            del self._queues[sid]
            for _, future in queue:  # only reached if the drain itself was cancelled
                if not future.done():
                    future.cancel()

    async def close(self, wait_s: float = 30.0) -> None:
        """Take no more items; let every queue drain (its batches apply and commit, callers or
        not), then stop. Only a drain still running after `wait_s` is cancelled."""
        self._closed = True
        if self._tasks:
            _, late = await asyncio.wait(set(self._tasks), timeout=wait_s)
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)
