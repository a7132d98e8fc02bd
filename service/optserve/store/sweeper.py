"""Periodic clean-up after sessions that expired (or were deleted).

Redis expires a session's data by itself (see redis_store.py), even with no optserve running.
What it cannot know about: the listing indexes (sorted sets outside every hash tag) and keys a
session left beside its data with their own, sometimes longer, TTLs (sync-round keys, idempotency
records of a deleted session, staged arrays of a commit whose process died). A session whose meta
is gone is gone for good (ids are never reused and every write checks the meta first), so every
key still in its hash tag is debris: one pass removes it and the index entry.

Listing also drops index entries lazily (engine/sessions.py), so a list is right between passes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import defaultdict

from . import keys
from .errors import StoreUnavailable
from .redis_store import RedisStore, _guard
from .tenants import TenantIndex

log = logging.getLogger("optserve.sweeper")

#: Keys asked for per SCAN/ZSCAN step, and ids checked per EXISTS round trip.
BATCH = 1000


async def _gone(store: RedisStore, sids: list[str]) -> set[str]:
    """The ids among `sids` whose meta no longer exists."""

    async def run() -> list:
        async with store.client.pipeline(transaction=False) as pipe:
            for sid in sids:
                pipe.exists(keys.meta_key(sid))
            return await pipe.execute()

    return {sid for sid, alive in zip(sids, await _guard(run), strict=True) if not alive}


async def sweep(store: RedisStore) -> tuple[int, int]:
    """One pass: (index entries dropped, leftover keys removed)."""
    dropped = 0
    cursor = 0
    while True:
        cursor, entries = await _guard(
            lambda c=cursor: store.client.zscan(keys.SESSION_INDEX, c, count=BATCH)
        )
        sids = [member.decode() for member, _ in entries]
        gone = await _gone(store, sids) if sids else set()
        dropped += await store.forget(gone)
        if cursor == 0:
            break
    await TenantIndex(store.client).sweep()  # the per-tenant listings too (not counted)
    removed = 0
    by_sid: dict[str, list[bytes]] = defaultdict(list)

    async def flush() -> int:
        gone = await _gone(store, list(by_sid))
        doomed = [key for sid in gone for key in by_sid[sid]]
        by_sid.clear()
        if doomed:
            await _guard(lambda: store.client.unlink(*doomed))
        return len(doomed)

    async for key in store.client.scan_iter(match=keys.SESSION_KEYS_PATTERN, count=BATCH):
        sid = keys.sid_of_key(key)
        if sid is not None:
            by_sid[sid].append(key)
        if len(by_sid) >= BATCH:
            removed += await flush()
    removed += await flush()
    return dropped, removed


async def run_forever(store: RedisStore, interval_s: float) -> None:
    """Sweep every `interval_s` seconds until cancelled; a store outage only skips a pass."""
    while True:
        await asyncio.sleep(interval_s)
        try:
            dropped, removed = await sweep(store)
        except StoreUnavailable as error:
            log.warning("session sweep skipped: %s", error)
            continue
        except Exception:
            log.exception("session sweep failed")
            continue
        if dropped or removed:
            log.info("swept %d gone session(s) from the index, %d leftover keys", dropped, removed)


@contextlib.asynccontextmanager
async def sweeping(store: RedisStore, interval_s: float):
    """Run the sweeper for the life of the block (the app's lifespan)."""
    task = asyncio.create_task(run_forever(store, interval_s), name="optserve-sweeper")
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
