"""The hot engine's Redis side: the ownership lease, the gradient log and the snapshot.

With the hot engine (engine/hot) one process owns a session and keeps it in memory; Redis holds
what recovery needs: the newest snapshot (the same chunked array keys the write-through engine
uses, plus a meta field naming the version and log entry it covers) and a log (a stream) of every
push acknowledged since, in order.

Fencing: the lease value starts with a token from INCR, so each new owner's is larger. Every
append and snapshot runs a script that first checks the lease still holds the writer's token,
so a process that lost the session (paused past its lease, partitioned, or taken over) can no
longer write: its append fails and it drops the session from memory.

The gradient bytes do not pass through Lua (DESIGN.md: Redis copies script arguments twice on
its one thread; 26 vs 45 commits/s at 1M elements). As in `commit.lua`, the pipeline first SETs
them to staged keys and the fenced script RENAMEs them into place (O(1)) next to a small stream
entry, so one append is one round trip and the stream entries stay small.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources

import redis.asyncio as aioredis

from . import keys
from .cluster import queue_script, same_node, with_scripts
from .errors import IdempotencyConflict, SessionGone
from .redis_store import Buffer, _chunks, _guard, _manifest_value, _parse_manifest

STAGED_TTL_MS = 120_000
_SCRIPTS = resources.files(__package__)


def _script(name: str) -> str:
    return _SCRIPTS.joinpath(name).read_text()


class FencedOff(Exception):
    """The lease no longer holds this writer's token: another process owns the session."""


class StoreBehind(Exception):
    """The stored version is not the owner's: the store lost acknowledged writes (restarted from
    an older AOF). The owner must not write on top of that gap: it reloads from the store."""

    def __init__(self, sid: str, stored: int) -> None:
        super().__init__(f"{sid}: the store is at version {stored}")
        self.stored = stored


@dataclass(frozen=True)
class Holder:
    """Who holds a session's lease: fencing token, process id, advertised URL."""

    token: int
    owner: str
    url: str

    @classmethod
    def parse(cls, value: bytes | str) -> Holder:
        text = value.decode() if isinstance(value, bytes) else value
        token, owner, url = text.split(" ", 2)
        return cls(int(token), owner, url)

    @property
    def prefix(self) -> str:
        """What the fenced scripts compare the lease value with."""
        return f"{self.token} {self.owner} "


@dataclass
class LogPush:
    """One applied push as the log keeps it: what replay needs to repeat it bit for bit."""

    version: int
    #: the lr the step ran with (after a staleness scaling), as Python float text (exact)
    lr: float
    #: the schedule state after the step (JSON)
    schedule: str
    #: the float32 gradients (after any F16/BF16 upcast, before clipping), in apply order
    grads: Mapping[str, Buffer]


@dataclass
class LogConfig:
    """A hyperparameter change (PATCH): the whole new config and schedule, as JSON."""

    version: int
    config: str
    schedule: str


@dataclass
class LogEntry:
    """An entry read back: its stream id, kind, fields and (pushes) gradient chunks."""

    id: str
    kind: str
    version: int
    fields: dict[str, str]
    #: tensor -> chunk count (pushes)
    tensors: dict[str, int] = field(default_factory=dict)
    #: tensor -> its gradient's chunks (pushes)
    grads: dict[str, list[bytes]] = field(default_factory=dict)

    def array_keys(self, sid: str) -> list[str]:
        return [
            keys.log_array_key(sid, self.version, tensor, index)
            for tensor, count in self.tensors.items()
            for index in range(count)
        ]


class HotLog:
    """Lease, log and snapshot operations of the hot engine; coroutines, errors as the store's."""

    def __init__(
        self, client: aioredis.Redis, *, fsync_always: bool = False, chunk_bytes: int
    ) -> None:
        self.client = client
        self.fsync_always = fsync_always
        self.chunk_bytes = chunk_bytes
        self._acquire = client.register_script(_script("hot_acquire.lua"))
        self._renew = client.register_script(_script("hot_renew.lua"))
        self._append = client.register_script(_script("hot_append.lua"))
        self._snapshot = client.register_script(_script("hot_snapshot.lua"))
        self._touch = client.register_script(_script("touch.lua"))

    # -- the lease -------------------------------------------------------------------------------

    async def acquire(self, sid: str, owner: str, url: str, ttl_ms: int) -> tuple[int, Holder]:
        """(2, us) newly ours with a new token, (1, us) ours already, (0, them) held by another."""
        status, value = await _guard(
            lambda: self._acquire(
                keys=[keys.owner_key(sid), keys.fence_key(sid), keys.meta_key(sid)],
                args=[owner, url, ttl_ms],
            )
        )
        if int(status) < 0:
            raise SessionGone(sid)
        return int(status), Holder.parse(value)

    async def holder(self, sid: str) -> Holder | None:
        value = await _guard(lambda: self.client.get(keys.owner_key(sid)))
        return Holder.parse(value) if value else None

    async def renew(self, sid: str, holder: Holder, ttl_ms: int) -> bool:
        return bool(
            await _guard(
                lambda: self._renew(
                    keys=[keys.owner_key(sid), keys.meta_key(sid)], args=[holder.prefix, ttl_ms]
                )
            )
        )

    async def release(self, sid: str, holder: Holder) -> bool:
        return bool(
            await _guard(
                lambda: self._renew(
                    keys=[keys.owner_key(sid), keys.meta_key(sid)], args=[holder.prefix, ""]
                )
            )
        )

    # -- the log ---------------------------------------------------------------------------------

    async def append(
        self,
        sid: str,
        holder: Holder,
        entries: Sequence[LogPush | LogConfig],
        meta: Mapping[str, str],
        *,
        at: int,
        version: int | None,
        idempotency: Mapping[str, str] | None = None,
        idempotency_ttl_ms: int = 86_400_000,
        renew: Sequence[str] = (),
        ttl: str = "",
        lease_ms: int = 2_000,
    ) -> list[tuple[str, list[str]]]:
        """Append `entries` (and create the idempotency records, set `meta` and the new
        `version`) in one fenced script; returns each entry's (id, gradient keys). One round
        trip, plus the AOF fsync wait with fsync=always: a push is acknowledged only after it.
        `at` is the version the owner's memory was at: if the store is not (it lost writes),
        StoreBehind. A session with a TTL is used by each append: the meta, the log and the
        `renew` keys (every array and logged gradient it has) get it again, all in the same
        script so none expires before the meta; `ttl` changes it ("none" removes it). The
        lease is renewed for `lease_ms` too: a busy owner keeps it without the renewal loop.
        Raises FencedOff, SessionGone, StoreBehind or IdempotencyConflict, and then
        nothing was written."""
        token = secrets.token_hex(8)
        staged: list[str] = []
        writes: list[tuple[str, memoryview]] = []
        args_entries: list[str] = []
        entry_keys: list[list[str]] = []
        for entry in entries:
            entry_keys.append([])
            if isinstance(entry, LogPush):
                counts = {}
                for tensor, data in entry.grads.items():
                    parts = _chunks(data, self.chunk_bytes)
                    counts[tensor] = len(parts)
                    for index, part in enumerate(parts):
                        key = keys.log_staged_key(sid, token, entry.version, tensor, index)
                        writes.append((key, part))
                        live = keys.log_array_key(sid, entry.version, tensor, index)
                        staged += [key, live]
                        entry_keys[-1].append(live)
                fields = {
                    "kind": "push",
                    "version": str(entry.version),
                    "lr": repr(float(entry.lr)),
                    "schedule": entry.schedule,
                    "tensors": _manifest_value(counts),
                }
            else:
                fields = {
                    "kind": "config",
                    "version": str(entry.version),
                    "config": entry.config,
                    "schedule": entry.schedule,
                }
            args_entries.append(str(len(fields)))
            for name, value in fields.items():
                args_entries += [name, value]
        records = dict(idempotency or {})
        args: list[str | int] = [
            holder.prefix,
            len(staged) // 2,
            len(records),
            idempotency_ttl_ms,
            keys.events_channel(sid),
            "" if version is None else str(version),
            len(entries),
            at,
            ttl,
            lease_ms,
            *records.values(),
            *args_entries,
        ]
        for name, value in meta.items():
            args += [name, value]
        script_keys = [keys.owner_key(sid), keys.meta_key(sid), keys.log_key(sid), *staged]
        script_keys += [keys.idempotency_key(sid, digest) for digest in records]
        if renew or ttl:
            script_keys += [*renew, *(key for keys_ in entry_keys for key in keys_)]
        reply = await self._run(writes, self._append, script_keys, args)
        status = int(reply[0])
        if status == -4:
            raise FencedOff(sid)
        if status == -1:
            raise SessionGone(sid)
        if status == -2:
            raise StoreBehind(sid, int(reply[1]))
        if status == -3:
            raise IdempotencyConflict(sid)
        ids = [entry_id.decode() for entry_id in reply[1:]]
        return list(zip(ids, entry_keys, strict=True))

    async def read(self, sid: str, after: str, count: int = 8) -> list[LogEntry]:
        """Up to `count` entries after id `after`, pushes with their gradient bytes."""
        raw = await _guard(lambda: self.client.xrange(keys.log_key(sid), f"({after}", "+", count))
        entries = []
        for entry_id, values in raw:
            fields = {k.decode(): v.decode() for k, v in values.items()}
            entry = LogEntry(entry_id.decode(), fields["kind"], int(fields["version"]), fields)
            if entry.kind == "push":
                entry.tensors = _parse_manifest(fields["tensors"])
                # the manifest format sorts names; the push's own order is the session's
            entries.append(entry)
        wanted = [(e, k) for e in entries for k in e.array_keys(sid)]
        if wanted:
            values = await _guard(lambda: self.client.mget([k for _, k in wanted]))
            for (entry, key), value in zip(wanted, values, strict=True):
                if value is None:
                    raise RuntimeError(f"log of {sid}: gradient {key} is missing")
                tensor = key.split(":", 5)[-1]
                entry.grads.setdefault(tensor, []).append(value)
        return entries

    # -- the snapshot ----------------------------------------------------------------------------

    async def write_snapshot(
        self,
        sid: str,
        holder: Holder,
        arrays: Mapping[str, Mapping[str, Buffer]],
        old_manifests: Mapping[str, Mapping[str, int]],
        snapshot: str,
        covered: Sequence[LogEntry | tuple[str, list[str]]],
        meta: Mapping[str, str] | None = None,
        *,
        at: int,
        version: int | None = None,
        renew: Sequence[str] | None = None,
        ttl: str = "",
    ) -> dict[str, dict[str, int]]:
        """Replace the stored arrays with `arrays` (every array of every tensor: a tensor's
        arrays not in it are deleted), set the snapshot field, delete the `covered` log entries
        (id, gradient keys) and their gradients: one fenced script. Returns the new manifests.
        `version` (PUT params/state, which are snapshots) also sets and publishes the version;
        the store must then be at version `at`, else at least at `at` (StoreBehind). With
        `renew` (a session with a TTL) the arrays written and those keys get the TTL again."""
        token = secrets.token_hex(8)
        staged: list[str] = []
        writes: list[tuple[str, memoryview]] = []
        deletes: list[str] = []
        fields = dict(meta or {})
        manifests: dict[str, dict[str, int]] = {}
        for tensor, values in arrays.items():
            counts: dict[str, int] = {}
            for name, data in values.items():
                parts = _chunks(data, self.chunk_bytes)
                counts[name] = len(parts)
                for index, part in enumerate(parts):
                    key = keys.staged_key(sid, token, tensor, name, index)
                    writes.append((key, part))
                    staged += [key, keys.array_key(sid, tensor, name, index)]
            manifests[tensor] = counts
            old = old_manifests.get(tensor, {})
            if counts != old:
                fields[keys.manifest_field(tensor)] = _manifest_value(counts)
            deletes += [
                keys.array_key(sid, tensor, name, index)
                for name, count in old.items()
                for index in range(counts.get(name, 0), count)
            ]
        ids = []
        for item in covered:
            entry_id, gradient_keys = (
                (item.id, item.array_keys(sid)) if isinstance(item, LogEntry) else item
            )
            ids.append(entry_id)
            deletes += gradient_keys
        args: list[str | int] = [
            holder.prefix,
            len(staged) // 2,
            len(deletes),
            snapshot,
            keys.events_channel(sid),
            "" if version is None else str(version),
            len(ids),
            at,
            ttl,
            *ids,
        ]
        for name, value in fields.items():
            args += [name, value]
        script_keys = [keys.owner_key(sid), keys.meta_key(sid), keys.log_key(sid)]
        script_keys += [*staged, *deletes]
        if renew is not None or ttl:
            script_keys += [*(renew or ()), *staged[1::2]]
        reply = await self._run(writes, self._snapshot, script_keys, args)
        if int(reply[0]) == -4:
            raise FencedOff(sid)
        if int(reply[0]) == -1:
            raise SessionGone(sid)
        if int(reply[0]) == -2:
            raise StoreBehind(sid, int(reply[1]))
        return manifests

    async def touch(self, sid: str, version: int, renew: Sequence[str]) -> bool:
        """A read is a use: renew the TTL of the meta, the log and the `renew` keys (the
        store's touch script). False if the session is gone (or at another version)."""
        script_keys = [keys.meta_key(sid), keys.log_key(sid), *renew]
        return bool(await _guard(lambda: self._touch(keys=script_keys, args=[version])))

    async def delete(self, sid: str, gradient_keys: Sequence[str]) -> None:
        """Remove the log, its gradients, the lease and the fencing counter (session deleted)."""
        doomed = [keys.log_key(sid), keys.owner_key(sid), keys.fence_key(sid), *gradient_keys]
        await _guard(lambda: self.client.unlink(*doomed))

    async def _run(self, writes, script, script_keys, args) -> list:
        """SET the staged chunks, run the script, wait for the fsync if asked: one round trip
        (on a cluster, all on the session's node: see store/cluster.py)."""
        sid_key = script_keys[1]  # the meta key: the session's node

        async def run() -> list:
            async with self.client.pipeline(transaction=False) as pipe:
                for key, part in writes:
                    pipe.set(key, part, px=STAGED_TTL_MS)
                await queue_script(pipe, script, script_keys, args)
                if self.fsync_always:
                    node = await same_node(self.client, sid_key)
                    pipe.execute_command("WAITAOF", 1, 0, 0, **node)
                replies = await pipe.execute()
            return replies[-2] if self.fsync_always else replies[-1]

        return await _guard(lambda: with_scripts(self.client, [script], run))
