"""The Redis store: atomic snapshot reads and compare-and-set commits of a session's arrays.

The store moves bytes, not numbers: arrays arrive and leave as raw little-endian bytes and the
engine turns them into numpy arrays. A commit is one pipelined round trip: the new arrays are
written to staged keys (same hash slot, short TTL), then `commit.lua` checks the version and
renames them into place, so no reader ever sees a half-written session and no multi-MB value
passes through Lua. With fsync=always the same connection then waits for the AOF fsync
(`WAITAOF 1 0`) before the commit returns.

Session lifetime: a session with a TTL (meta field `ttl_ms`) expires natively in Redis, so it
goes even when no optserve process runs. Every key of the session (meta and every array chunk)
carries the same expiry: creation sets it, each commit re-sets it on all of them (the commit
script refuses if the TTL changed since the caller read the key list), and reads renew it with
`touch.lua`. A session is therefore either whole or gone. Keys outside the manifests keep their
own TTLs: staged arrays and the lease (short), idempotency records (idempotency_ttl_s, so a
retry never applies twice while the session lives); store/sweeper.py removes them, and the
listing index entry, once the session is gone.

The same code runs on one server or on a Redis Cluster (store/cluster.py has the differences):
a session's keys share one slot, and the one key outside it, the session index, is written in
a step of its own there, ordered so that a crash leaves at worst an index entry without a
session (listing skips it), never a session missing from the index.
"""

from __future__ import annotations

import functools
import secrets
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, ParamSpec, TypeVar

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisClusterException, RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ..metrics import Metrics
from . import keys
from .cluster import (
    check_cluster_setting,
    client_for,
    detect_cluster,
    is_outage,
    queue_script,
    same_node,
    with_scripts,
)
from .errors import IdempotencyConflict, SessionGone, StoreUnavailable, VersionConflict

#: Staged arrays of a commit that never ran (its process died) disappear after this long.
STAGED_TTL_MS = 120_000
#: On a cluster, how long after its id was listed a session may still be being written (its
#: create's MULTI not yet run): forget() leaves such ids alone.
CREATE_GRACE_S = 600.0
#: Largest Redis value an array is split into (Redis refuses values over 512 MiB, and big values
#: stall its single thread); 16 MiB = 4M float32 per chunk.
CHUNK_BYTES = 16 * 2**20

#: A store that does not accept a connection within this long is down (503 at once).
CONNECT_TIMEOUT_S = 2.0
#: A command that has not answered within this long fails as a 503 (OPTSERVE_STORE_TIMEOUT_S).
COMMAND_TIMEOUT_S = 10.0

#: What a write may pass: bytes, or a zero-copy view of an array's memory.
Buffer = bytes | bytearray | memoryview
_COMMIT_SCRIPT = resources.files(__package__).joinpath("commit.lua").read_text()
_TOUCH_SCRIPT = resources.files(__package__).joinpath("touch.lua").read_text()
#: commit(ttl_ms=KEEP): the session keeps the TTL it has.
KEEP: Any = object()
_RELEASE_SCRIPT = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


@dataclass
class Snapshot:
    """A consistent read of one session: meta at `version` and the arrays asked for."""

    sid: str
    version: int
    meta: dict[str, str]
    #: tensor -> {array name (`param` and its state fields): how many chunks it is stored in}
    manifests: dict[str, dict[str, int]]
    #: (tensor, field) -> the array's raw bytes, chunk by chunk
    arrays: dict[tuple[str, str], list[bytes]] = field(default_factory=dict)
    #: the token of the apply lease on this session, if some process holds it
    lease: str | None = None


def _decode_meta(raw: Mapping[bytes, bytes]) -> tuple[int, dict[str, str], dict[str, dict]]:
    meta = {k.decode(): v.decode() for k, v in raw.items()}
    manifests = {
        name[len(keys.MANIFEST_FIELD_PREFIX) :]: _parse_manifest(value)
        for name, value in meta.items()
        if name.startswith(keys.MANIFEST_FIELD_PREFIX)
    }
    return int(meta[keys.VERSION_FIELD]), meta, manifests


def _parse_manifest(value: str) -> dict[str, int]:
    """ "exp_avg:1,param:3" -> {"exp_avg": 1, "param": 3}."""
    entries = (item.rpartition(":") for item in value.split(",") if item)
    return {name: int(count) for name, _, count in entries}


def _manifest_value(counts: Mapping[str, int]) -> str:
    return ",".join(f"{name}:{counts[name]}" for name in sorted(counts))


def _array_keys(sid: str, manifests: Mapping[str, Mapping[str, int]]) -> list[str]:
    """Every array chunk key the manifests name."""
    return [
        keys.array_key(sid, tensor, name, index)
        for tensor, counts in manifests.items()
        for name, count in counts.items()
        for index in range(count)
    ]


def _ttl_of(meta: Mapping[str, str]) -> str:
    """The session's TTL in ms as the scripts compare it ("" for none)."""
    return meta.get(keys.TTL_FIELD, "")


P = ParamSpec("P")
R = TypeVar("R")


def _timed(method: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
    """Record the call's duration in optserve_store_duration_seconds{operation=<method name>},
    failed calls included (a timeout is latency too)."""
    operation = method.__name__

    @functools.wraps(method)
    async def timed(*args: P.args, **kwargs: P.kwargs) -> R:
        start = time.perf_counter()
        try:
            return await method(*args, **kwargs)
        finally:
            store: RedisStore = args[0]  # type: ignore[assignment]
            elapsed = time.perf_counter() - start
            store.metrics.store_seconds.labels(operation).observe(elapsed)

    return timed


def _pinned(options: Mapping[str, Any], timeout_s: float) -> dict[str, Any]:
    """Client options with redis-py's retries off and our timeouts (see from_url)."""
    pinned = dict(options)
    pinned.setdefault("retry", Retry(NoBackoff(), 0))
    pinned.setdefault("socket_connect_timeout", min(CONNECT_TIMEOUT_S, timeout_s))
    pinned.setdefault("socket_timeout", timeout_s)
    return pinned


def _chunks(data: Buffer, size: int) -> list[memoryview]:
    """Zero-copy slices of at most `size` bytes (one, possibly empty, for an empty array)."""
    view = memoryview(data).cast("B")
    count = max(1, -(-len(view) // size))
    return [view[i * size : (i + 1) * size] for i in range(count)]


class RedisStore:
    """Sessions in one Redis or Valkey, or a Redis Cluster; all methods are coroutines."""

    def __init__(
        self,
        client: aioredis.Redis | RedisCluster,
        *,
        fsync_always: bool = False,
        chunk_bytes: int = CHUNK_BYTES,
        metrics: Metrics | None = None,
    ) -> None:
        self.client = client
        self.cluster = isinstance(client, RedisCluster)
        self.metrics = metrics or Metrics(process=False)
        self.chunk_bytes = chunk_bytes
        self.fsync_always = fsync_always
        self._commit = client.register_script(_COMMIT_SCRIPT)
        self._release = client.register_script(_RELEASE_SCRIPT)
        self._touch = client.register_script(_TOUCH_SCRIPT)

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        cluster: bool = False,
        fsync_always: bool = False,
        chunk_bytes: int = CHUNK_BYTES,
        metrics: Metrics | None = None,
        timeout_s: float = COMMAND_TIMEOUT_S,
        **options,
    ) -> RedisStore:
        """A store on `url`, its failure modes pinned rather than left to redis-py's defaults
        (which differ by version and constructor: `Redis()` in 8.x retries ten times with
        backoff, seconds in all, before it reports a dead server).

        No command is ever re-sent by redis-py: a commit whose reply was lost may have applied,
        and sending it again would look like a conflict to the engine, which re-runs the batch,
        so a push sent without an Idempotency-Key would step twice. A failure is a
        StoreUnavailable at once (the API's 503 with Retry-After), and the HTTP client retries
        the push with its key instead. A dead store refuses the connection at once; a hung one
        fails after `timeout_s`. The same holds on a cluster (`cluster=True`): RedisCluster's
        own re-sends after a connection error are off too, while it still follows MOVED and
        ASK redirections (a redirected command did not run).
        """
        client = client_for(url, cluster=cluster, **_pinned(options, timeout_s))
        return cls(client, fsync_always=fsync_always, chunk_bytes=chunk_bytes, metrics=metrics)

    @classmethod
    async def connect(
        cls,
        url: str,
        *,
        cluster: bool | None = None,
        fsync_always: bool = False,
        chunk_bytes: int = CHUNK_BYTES,
        metrics: Metrics | None = None,
        timeout_s: float = COMMAND_TIMEOUT_S,
        **options,
    ) -> RedisStore:
        """from_url(), asking the server whether it is a cluster when `cluster` is None."""
        options = _pinned(options, timeout_s)
        if cluster is None:
            cluster = await detect_cluster(url, **options)
        else:
            await check_cluster_setting(url, cluster, **options)
        return cls.from_url(
            url,
            cluster=cluster,
            fsync_always=fsync_always,
            chunk_bytes=chunk_bytes,
            metrics=metrics,
            timeout_s=timeout_s,
            **options,
        )

    async def close(self) -> None:
        await self.client.aclose()

    @_timed
    async def ping(self) -> None:
        await _guard(self.client.ping)

    @_timed
    async def create(
        self, sid: str, meta: Mapping[str, str], arrays: Mapping[str, Mapping[str, Buffer]]
    ) -> None:
        """Write a new session at version 0 in one transaction; a `ttl_ms` meta field makes
        every key of it expire after that long (renewed by each commit and read)."""
        fields = dict(meta)
        ttl_ms = int(fields[keys.TTL_FIELD]) if fields.get(keys.TTL_FIELD) else None
        fields[keys.VERSION_FIELD] = "0"
        chunked = {
            tensor: {name: _chunks(data, self.chunk_bytes) for name, data in values.items()}
            for tensor, values in arrays.items()
        }
        for tensor, values in chunked.items():
            fields[keys.manifest_field(tensor)] = _manifest_value(
                {name: len(parts) for name, parts in values.items()}
            )

        async def run() -> None:
            async with self.client.pipeline(transaction=True) as pipe:
                pipe.hset(keys.meta_key(sid), mapping=fields)
                if ttl_ms is not None:  # first: the meta never outlives an array, even by 1 ms
                    pipe.pexpire(keys.meta_key(sid), ttl_ms)
                for tensor, values in chunked.items():
                    for name, parts in values.items():
                        for index, part in enumerate(parts):
                            key = keys.array_key(sid, tensor, name, index)
                            pipe.set(key, part, px=ttl_ms)
                if not self.cluster:
                    pipe.zadd(keys.SESSION_INDEX, {sid: time.time()})
                await pipe.execute()

        if not self.cluster:
            await _guard(run)
            return
        # The index lives in another slot: list it first, so that no session ever exists
        # unlisted. If the write then fails, the entry stays (the write may have landed before
        # the reply was lost); listing skips an entry whose session does not exist.
        await _guard(lambda: self.client.zadd(keys.SESSION_INDEX, {sid: time.time()}))
        await _guard(run)

    @_timed
    async def read_meta(self, sid: str) -> Snapshot:
        """Meta only (version, config, manifests, lease holder): one round trip, no arrays."""

        async def run() -> list:
            async with self.client.pipeline(transaction=False) as pipe:
                pipe.hgetall(keys.meta_key(sid))
                pipe.get(keys.lease_key(sid))
                return await pipe.execute()

        raw, lease = await _guard(run)
        if not raw:
            raise SessionGone(sid)
        version, meta, manifests = _decode_meta(raw)
        return Snapshot(sid, version, meta, manifests, lease=lease.decode() if lease else None)

    @_timed
    async def take_lease(self, sid: str, token: str, ttl_ms: int) -> bool:
        """Take the session's apply lease if nobody holds it (expires by itself if we die)."""
        return bool(
            await _guard(lambda: self.client.set(keys.lease_key(sid), token, nx=True, px=ttl_ms))
        )

    @_timed
    async def release_lease(self, sid: str, token: str) -> None:
        """Give the lease back, only if it is still ours."""
        await _guard(lambda: self._release(keys=[keys.lease_key(sid)], args=[token]))

    @_timed
    async def read(
        self,
        sid: str,
        params: Iterable[str] | None = None,
        state_of: Iterable[str] = (),
        *,
        attempts: int = 8,
        base: Snapshot | None = None,
    ) -> Snapshot:
        """A consistent snapshot: meta, `param` of `params` (None = every tensor) and every
        stored array of the tensors in `state_of`.

        Reads meta, then the arrays together with the version in one MULTI; if a commit landed
        in between, it reads again, so the arrays always belong to the version returned. Given
        the meta the caller just read (`base`), it skips that read and raises VersionConflict
        instead of reading again, for callers that restart their own work anyway. A read is a
        use: it renews the session's TTL in the same transaction.
        """
        wanted_state = tuple(state_of)
        for _ in range(attempts if base is None else 1):
            base = base or await self.read_meta(sid)
            names = list(base.manifests) if params is None else list(params)
            wanted = [(t, "param") for t in names]
            wanted += [
                (t, f) for t in wanted_state for f in base.manifests.get(t, {}) if f != "param"
            ]
            counts = [base.manifests.get(t, {}).get(f, 1) for t, f in wanted]
            array_keys = [
                keys.array_key(sid, t, f, i)
                for (t, f), count in zip(wanted, counts, strict=True)
                for i in range(count)
            ]

            async def run(array_keys: list[str] = array_keys, snapshot: Snapshot = base) -> list:
                async with self.client.pipeline(transaction=True) as pipe:
                    pipe.hget(keys.meta_key(sid), keys.VERSION_FIELD)
                    if array_keys:
                        pipe.execute_command("MGET", *array_keys)  # pipe.mget: not on a cluster
                    if _ttl_of(snapshot.meta):
                        await self._touch_in(pipe, snapshot)
                    return await pipe.execute()

            replies = await _guard(lambda run=run: with_scripts(self.client, [self._touch], run))
            if replies[0] is None:
                raise SessionGone(sid)
            if int(replies[0]) != base.version:
                current = int(replies[0])
                base = None
                continue
            values = iter(replies[1] if array_keys else [])  # (the touch's reply is last)
            for key, count in zip(wanted, counts, strict=True):
                parts = [next(values) for _ in range(count)]
                if all(part is not None for part in parts):
                    base.arrays[key] = parts
            return base
        raise VersionConflict(current)

    async def _touch_in(self, pipe: Any, snap: Snapshot) -> None:
        """Queue the touch script on a pipeline (awaiting it only queues it)."""
        keys_ = [keys.meta_key(snap.sid), *_array_keys(snap.sid, snap.manifests)]
        await queue_script(pipe, self._touch, keys_, [snap.version])

    @_timed
    async def touch(self, snap: Snapshot) -> None:
        """Renew the session's TTL (a use that reads only meta); nothing if it has none."""
        if _ttl_of(snap.meta):
            keys_ = [keys.meta_key(snap.sid), *_array_keys(snap.sid, snap.manifests)]
            await _guard(lambda: self._touch(keys=keys_, args=[snap.version]))

    @_timed
    async def commit(
        self,
        base: Snapshot,
        writes: Mapping[str, Mapping[str, Buffer]],
        meta: Mapping[str, str] | None = None,
        *,
        replace_state: Iterable[str] = (),
        bump_version: bool | int = True,
        conditional: bool = True,
        idempotency: Mapping[str, str] | None = None,
        idempotency_ttl_ms: int = 86_400_000,
        ttl_ms: int | None = KEEP,
    ) -> int:
        """Apply `writes` (tensor -> array name -> bytes) and `meta` atomically if the session is
        still at `base.version`; returns the new version.

        `bump_version` adds 1 (True), nothing (False) or that many updates (an int: a group
        commit of several pushes). Arrays of a tensor named in `replace_state` that are not
        written are deleted (a state import replaces the whole state); otherwise a tensor's other
        arrays stay. `idempotency` maps digests to records created in the same transaction; if
        one exists already, IdempotencyConflict. Raises VersionConflict or SessionGone too, and
        then nothing was applied. `ttl_ms` sets the session's TTL (None: never expires); by
        default it keeps the one in `base.meta`, and every key is renewed with it. A TTL changed
        by someone else since `base` was read is a VersionConflict (the key list may be stale).
        """
        sid = base.sid
        token = secrets.token_hex(8)
        fields = dict(meta or {})
        staged: list[str] = []
        deletes: list[str] = []
        replaced = set(replace_state)
        chunked = {
            tensor: {name: _chunks(data, self.chunk_bytes) for name, data in values.items()}
            for tensor, values in writes.items()
        }
        for tensor, values in chunked.items():
            old = dict(base.manifests.get(tensor, {}))
            new = {} if tensor in replaced else dict(old)
            new.update({name: len(parts) for name, parts in values.items()})
            if new != old:
                fields[keys.manifest_field(tensor)] = _manifest_value(new)
            for name, parts in values.items():
                for index in range(len(parts)):
                    staged.append(keys.staged_key(sid, token, tensor, name, index))
                    staged.append(keys.array_key(sid, tensor, name, index))
            deletes += [
                keys.array_key(sid, tensor, name, index)
                for name, count in old.items()
                for index in range(new.get(name, 0), count)
            ]
        records = dict(idempotency or {})
        increment = int(bump_version)
        old_ttl = _ttl_of(base.meta)
        new_ttl = old_ttl if ttl_ms is KEEP else ("" if ttl_ms is None else str(int(ttl_ms)))
        live: list[str] = []
        if old_ttl or new_ttl:
            manifests = {t: dict(c) for t, c in base.manifests.items()}
            for tensor, values in chunked.items():
                if tensor in replaced:
                    manifests[tensor] = {}
                manifests.setdefault(tensor, {}).update(
                    {name: len(parts) for name, parts in values.items()}
                )
            live = _array_keys(sid, manifests)
        # A staged array outlives a commit that never ran by at most this; keep it short for
        # a short-lived session (but long enough for the write of a big array to finish).
        staged_ms = min(STAGED_TTL_MS, max(int(new_ttl), 10_000)) if new_ttl else STAGED_TTL_MS
        args: list[str] = [
            str(base.version) if conditional else "",
            str(len(staged) // 2),
            str(len(deletes)),
            str(len(records)),
            str(increment),
            str(idempotency_ttl_ms),
            keys.events_channel(sid),
            old_ttl,
            new_ttl,
            *records.values(),
        ]
        for name, value in fields.items():
            args += [name, value]
        record_keys = [keys.idempotency_key(sid, digest) for digest in records]

        async def run() -> object:
            async with self.client.pipeline(transaction=False) as pipe:
                for tensor, values in chunked.items():
                    for name, parts in values.items():
                        for index, part in enumerate(parts):
                            key = keys.staged_key(sid, token, tensor, name, index)
                            pipe.set(key, part, px=staged_ms)
                await queue_script(
                    pipe,
                    self._commit,
                    [keys.meta_key(sid), *staged, *deletes, *record_keys, *live],
                    args,
                )
                if self.fsync_always:
                    pipe.execute_command("WAITAOF", 1, 0, 0, **await self._same_node(sid))
                replies = await pipe.execute()
            return replies[-2] if self.fsync_always else replies[-1]

        result = await _guard(lambda: with_scripts(self.client, [self._commit], run))
        if result == -1:
            raise SessionGone(sid)
        if isinstance(result, list):
            if int(result[0]) == -3:
                raise IdempotencyConflict(sid)
            raise VersionConflict(int(result[1]))
        return int(result)

    async def _same_node(self, sid: str) -> dict[str, Any]:
        """Where a keyless command must go to share the connection of the session's commands
        in a pipeline (WAITAOF waits for the writes of its own connection)."""
        return await same_node(self.client, keys.meta_key(sid))

    @_timed
    async def read_idempotency(self, sid: str, digests: list[str]) -> dict[str, str]:
        """The stored records of these idempotency digests (missing ones left out)."""
        if not digests:
            return {}
        values = await _guard(
            lambda: self.client.mget([keys.idempotency_key(sid, d) for d in digests])
        )
        return {d: v.decode() for d, v in zip(digests, values, strict=True) if v is not None}

    @_timed
    async def put_idempotency(self, sid: str, digest: str, record: str, ttl_ms: int) -> None:
        """Store a response record outside a commit (sync rounds); the first one wins."""
        key = keys.idempotency_key(sid, digest)
        await _guard(lambda: self.client.set(key, record, nx=True, px=ttl_ms))

    @_timed
    async def version(self, sid: str) -> int:
        raw = await _guard(lambda: self.client.hget(keys.meta_key(sid), keys.VERSION_FIELD))
        if raw is None:
            raise SessionGone(sid)
        return int(raw)

    @_timed
    async def delete(self, sid: str) -> bool:
        """Remove the session's meta and every array; False if it did not exist."""
        try:
            base = await self.read_meta(sid)
        except SessionGone:
            await _guard(lambda: self.client.zrem(keys.SESSION_INDEX, sid))
            return False
        doomed = [keys.meta_key(sid), keys.lease_key(sid), *_array_keys(sid, base.manifests)]

        async def run() -> None:
            async with self.client.pipeline(transaction=True) as pipe:
                pipe.execute_command("UNLINK", *doomed)  # pipe.unlink differs on a cluster
                if not self.cluster:
                    pipe.zrem(keys.SESSION_INDEX, sid)
                await pipe.execute()

        await _guard(run)
        if self.cluster:  # the index is in another slot: unlisted only once it is gone
            await _guard(lambda: self.client.zrem(keys.SESSION_INDEX, sid))
        return True

    @_timed
    async def forget(self, sids: Iterable[str]) -> int:
        """Drop ids of sessions that are gone (expired) from the listing index; returns how
        many it dropped.

        On a cluster a new id is listed before its session is written (see create), so an id
        listed less than CREATE_GRACE_S ago may be a session still being created: it stays
        (listing skips it meanwhile) until a later call finds it older.
        """
        sids = list(sids)
        if sids and self.cluster:
            scores = await _guard(lambda: self.client.zmscore(keys.SESSION_INDEX, sids))
            cutoff = time.time() - CREATE_GRACE_S
            sids = [s for s, score in zip(sids, scores, strict=True) if score and score < cutoff]
        if not sids:
            return 0
        return int(await _guard(lambda: self.client.zrem(keys.SESSION_INDEX, *sids)))

    @_timed
    async def list_ids(self, offset: int = 0, limit: int = 100) -> list[str]:
        """Session ids, oldest first."""
        raw = await _guard(
            lambda: self.client.zrange(keys.SESSION_INDEX, offset, offset + limit - 1)
        )
        return [value.decode() for value in raw]

    @_timed
    async def count(self) -> int:
        return int(await _guard(lambda: self.client.zcard(keys.SESSION_INDEX)))


async def _guard(call: Callable[[], Awaitable[Any]]) -> Any:
    """Run a Redis call; connection failures become StoreUnavailable (the API's 503)."""
    try:
        return await call()
    except (RedisConnectionError, RedisTimeoutError, OSError) as error:
        raise StoreUnavailable(str(error)) from error
    except RedisError as error:
        if "LOADING" in str(error) or "BUSY" in str(error) or is_outage(error):
            raise StoreUnavailable(str(error)) from error
        raise
    except RedisClusterException as error:
        if is_outage(error):
            raise StoreUnavailable(str(error)) from error
        raise
