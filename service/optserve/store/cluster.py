"""Redis Cluster: which client a URL gets, and the few commands a cluster needs sent otherwise.

Every key of a session carries its hash tag (keys.py), so every script, MULTI and pipeline of
one session lands on one node, and that is all a cluster needs of the code above this. What
differs is the client's plumbing, gathered here so the single-server path stays as it was:

* Which client: `OPTSERVE_REDIS_CLUSTER` true or false decides; unset, `INFO cluster` on the
  URL's server says (`cluster_enabled:1`). redis-py's RedisCluster takes a plain redis:// URL
  of any one node and finds the others itself.
* Scripts inside pipelines: redis-py's ClusterPipeline refuses `evalsha` and does not load
  scripts the way a one-server pipeline does, so a script is queued as a raw EVALSHA and a
  NOSCRIPT reply loads the scripts on every primary and runs the pipeline again (safe: a
  NOSCRIPT means the script did nothing, and the rest of such a pipeline only stages keys).
* MGET and UNLINK in pipelines: ClusterPipeline blocks `mget` and makes `unlink` a coroutine;
  the raw commands behave the same on both clients (their keys share one slot).
* Pub/sub: plain PUBLISH is broadcast to every node of a cluster, so one ordinary connection
  to any one primary hears every session's events with one PSUBSCRIBE, as on a single server.
  Sharded pub/sub (SPUBLISH/SSUBSCRIBE) would spare the broadcast but needs one subscription
  per watched session on the node that owns it, redone on every resharding; messages here are
  a few bytes per new version, so the broadcast is the simpler good choice.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.asyncio.client import PubSub
from redis.asyncio.cluster import ClusterPipeline, RedisCluster
from redis.commands.core import AsyncScript
from redis.exceptions import (
    ClusterDownError,
    NoScriptError,
    RedisClusterException,
    RedisError,
    SlotNotCoveredError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .errors import StartupRefused

log = logging.getLogger("optserve.store")

T = TypeVar("T")
Client = aioredis.Redis | RedisCluster
Pipeline = aioredis.client.Pipeline | ClusterPipeline

#: How long startup keeps asking an unreachable store whether it is a cluster.
DETECT_TIMEOUT_S = 30.0


def is_outage(error: BaseException) -> bool:
    """A cluster error that means "the store is (partly) down, try later", not a bug: no node
    reachable, the cluster down or a slot without a master, a slot in migration."""
    if isinstance(error, ClusterDownError | TryAgainError | SlotNotCoveredError):
        return True
    return type(error) is RedisClusterException  # "Redis Cluster cannot be connected ..."


async def _cluster_enabled(url: str, **options) -> bool:
    """One `INFO cluster` on the URL's server: is it in cluster mode? Raises what the client
    raised when it cannot tell."""
    probe = aioredis.Redis.from_url(url, **options)
    try:
        info = await probe.info("cluster")
    finally:
        await probe.aclose()
    return bool(int(info.get("cluster_enabled", 0)))


async def detect_cluster(url: str, *, timeout_s: float = DETECT_TIMEOUT_S, **options) -> bool:
    """Ask the URL's server whether it runs in cluster mode (`INFO cluster`).

    Retries while the store is unreachable (or loading), up to `timeout_s`; then, or at once
    if the server refuses to answer (e.g. an ACL without INFO), raises: guessing wrong would
    fail every request later. OPTSERVE_REDIS_CLUSTER skips the question.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    delay = 0.1
    while True:
        try:
            return await _cluster_enabled(url, **options)
        except (RedisError, OSError) as error:
            unreachable = isinstance(error, RedisConnectionError | RedisTimeoutError | OSError)
            if not unreachable or loop.time() + delay > deadline:
                raise StartupRefused(
                    f"cannot tell whether {_safe(url)} is a Redis Cluster ({error}); set "
                    "OPTSERVE_REDIS_CLUSTER=1 or 0 to say so, or make the store reachable"
                ) from error
            log.warning("store not reachable yet (%s); asking again in %.1fs", error, delay)
        await asyncio.sleep(delay)
        delay = min(delay * 2, 2.0)


async def check_cluster_setting(
    url: str, cluster: bool, *, timeout_s: float = 1.0, **options
) -> None:
    """Refuse a forced OPTSERVE_REDIS_CLUSTER that the store contradicts, with advice, instead
    of failing every request later. A store that cannot answer now (down, loading, an ACL
    without INFO) is taken at its word: the setting exists for exactly that case."""
    try:
        enabled = await asyncio.wait_for(
            _cluster_enabled(url, **{**options, "socket_timeout": timeout_s}), timeout_s
        )
    except (RedisError, OSError, TimeoutError):
        return
    if enabled != cluster:
        raise StartupRefused(
            f"OPTSERVE_REDIS_CLUSTER={int(cluster)}, but {_safe(url)} says cluster_enabled:"
            f"{int(enabled)}; set OPTSERVE_REDIS_CLUSTER={int(enabled)}, or leave it unset to "
            "ask the store"
        )


def client_for(url: str, *, cluster: bool, **options) -> Client:
    """A cluster client (any node's URL finds the others) or a one-server client."""
    if cluster:
        return RedisCluster.from_url(url, **options)
    return aioredis.Redis.from_url(url, **options)


async def queue_script(
    pipe: Pipeline, script: AsyncScript, keys: Sequence[Any], args: Iterable[Any]
) -> None:
    """Add a script call to a pipeline of either client (see the module docstring)."""
    if isinstance(pipe, ClusterPipeline):
        pipe.execute_command("EVALSHA", script.sha, len(keys), *keys, *args)
    else:
        await script(keys=keys, args=args, client=pipe)


async def same_node(client: Client, key: str) -> dict[str, Any]:
    """Keyword arguments that send a keyless command in a pipeline to the node holding `key`,
    on the same connection as that key's commands (WAITAOF, TIME); on one server, none."""
    if not isinstance(client, RedisCluster):
        return {}
    await client.initialize()  # at once if it is already
    return {"target_nodes": client.get_node_from_key(key)}


async def with_scripts(
    client: Client, scripts: Iterable[AsyncScript], run: Callable[[], Awaitable[T]]
) -> T:
    """Run a pipeline that calls `scripts`; on a cluster, load them after a NOSCRIPT and rerun.

    A one-server pipeline loads its scripts itself before it runs.
    """
    try:
        return await run()
    except NoScriptError:
        if not isinstance(client, RedisCluster):
            raise
        for script in scripts:
            await client.script_load(script.script)  # sent to every primary
        return await run()


async def open_pubsub(client: Client) -> PubSub:
    """A pub/sub connection that hears every PUBLISH of the store.

    On a cluster: a plain connection to one primary, picked at random so that after a node
    fails the next reconnect likely lands elsewhere; `aclose()` also closes that connection.
    """
    if not isinstance(client, RedisCluster):
        return client.pubsub()
    await client.initialize()  # at once if it is already
    node = random.choice(client.get_primaries())
    return _NodePubSub(
        aioredis.ConnectionPool(connection_class=node.connection_class, **node.connection_kwargs)
    )


class _NodePubSub(PubSub):
    """PubSub on a pool of its own, closed with it."""

    def __init__(self, pool: aioredis.ConnectionPool) -> None:
        super().__init__(connection_pool=pool)

    async def aclose(self) -> None:
        try:
            await super().aclose()
        finally:
            await self.connection_pool.disconnect()


def _safe(url: str) -> str:
    """The URL without its password, for messages."""
    scheme, sep, rest = url.partition("://")
    if "@" in rest:
        rest = "***@" + rest.split("@", 1)[1]
    return f"{scheme}{sep}{rest}"
