"""Group commit: one drain task per session per process takes everything queued and applies it
as one batch (one state load, one commit), so many workers on one session cost one Redis round
trip per batch instead of one per push (DESIGN.md, Engine)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

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

    async def submit(self, sid: str, item: Item) -> Result:
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

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
