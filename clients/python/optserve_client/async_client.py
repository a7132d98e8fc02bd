"""The asynchronous client: `Client` and `Session` with `await`, over `httpx.AsyncClient`.

Every request, every parse and every retry decision comes from `_base`, exactly as for the sync
client; only sending and sleeping are awaited here. Runs on asyncio or trio (through anyio,
which httpx already depends on). Docstrings are short: the sync methods of the same names say
what each call means.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from types import TracebackType
from typing import Any, TypeVar

import anyio
import httpx
import numpy as np

from ._async_transport import AsyncPlainTransport
from ._base import (
    LIST_PAGE,
    UNSET,
    BaseClient,
    BaseSession,
    Call,
    RetryPolicy,
    Returning,
    Shape,
    _Unset,
)
from ._transport import plain_http

__all__ = ["AsyncClient", "AsyncSession"]

T = TypeVar("T")


class AsyncClient(BaseClient):
    """`Client` for asyncio/trio code: the same settings, retries and methods, all awaited.

    Use `async with AsyncClient(url) as client:`, or call `await client.aclose()`. One client
    (one connection pool) serves any number of concurrent calls and sessions.
    """

    def __init__(
        self,
        url: str,
        api_key: str | None = None,
        *,
        timeout: float | None = 60.0,
        codec: str = "safetensors",
        retries: RetryPolicy | int | None = RetryPolicy(),  # noqa: B008 - frozen, so shareable
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        super().__init__(url, api_key, timeout=timeout, codec=codec, retries=retries)
        # plain http:// on asyncio's socket calls (less than half the CPU per large tensor, see
        # _async_transport.py); https://, a proxy and a transport given here: httpx's own
        mounts = {"http://": AsyncPlainTransport()} if plain_http(transport) else None
        self._http = httpx.AsyncClient(transport=transport, mounts=mounts, timeout=timeout)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Release pooled connections."""
        await self._http.aclose()

    async def _run(self, call: Call[T]) -> T:
        """Client._run with `await`: send until `Attempts` says stop."""
        attempts = self._attempts(call)
        while True:
            attempts.count += 1
            try:
                response = await self._http.send(call.request)
            except httpx.RequestError as exc:
                wait = attempts.after_error(exc)
                if wait is None:
                    raise attempts.transport_error(exc) from exc
            else:
                wait = attempts.after_response(response)
                if wait is None:
                    return attempts.finish(response)
            await anyio.sleep(wait)

    async def create_session(
        self,
        optimizer: str | Mapping[str, Any],
        params: Mapping[str, np.ndarray] | None = None,
        *,
        tensors: Mapping[str, Shape] | None = None,
        lr_schedule: Mapping[str, Any] | None = None,
        clip_grad_norm: float | None = None,
        nonfinite: str = "reject",
        name: str | None = None,
        max_staleness: int | None = None,
        staleness: str | None = None,
        ttl_s: float | None = None,
        mode: Mapping[str, Any] | None = None,
        **hyperparameters: Any,
    ) -> AsyncSession:
        """Create a session and return a handle on it (see Client.create_session)."""
        call = self._create_call(
            optimizer, params, tensors=tensors, lr_schedule=lr_schedule,
            clip_grad_norm=clip_grad_norm, nonfinite=nonfinite, name=name,
            max_staleness=max_staleness, staleness=staleness, hyperparameters=hyperparameters,
            ttl_s=ttl_s, mode=mode,
        )  # fmt: skip
        info = await self._run(call)
        return AsyncSession(self, info["id"], int(info["version"]))

    async def session(self, sid: str) -> AsyncSession:
        """Join an existing session (one GET, so a wrong id fails here)."""
        info = await self._run(self._session_call(sid))
        return AsyncSession(self, info["id"], int(info["version"]))

    async def list_sessions(
        self, *, offset: int = 0, limit: int | None = None
    ) -> list[dict[str, Any]]:
        """Session descriptions; `limit=None` walks every page the server has."""
        if limit is not None:
            return await self._run(self._list_call(offset, limit))
        sessions: list[dict[str, Any]] = []
        while True:
            page = await self._run(self._list_call(offset + len(sessions), LIST_PAGE))
            sessions.extend(page)
            if len(page) < LIST_PAGE:
                return sessions


class AsyncSession(BaseSession):
    """`Session` with awaited methods; `version` is the newest version this handle saw."""

    _client: AsyncClient

    async def info(self) -> dict[str, Any]:
        """The session as the server has it now."""
        return await self._client._run(self._info_call())

    async def update(
        self,
        *,
        clip_grad_norm: float | _Unset | None = UNSET,
        nonfinite: str | _Unset = UNSET,
        name: str | _Unset | None = UNSET,
        max_staleness: int | _Unset | None = UNSET,
        staleness: str | _Unset = UNSET,
        ttl_s: float | _Unset | None = UNSET,
        **hyperparameters: Any,
    ) -> dict[str, Any]:
        """Change hyperparameters in flight (see Session.update)."""
        call = self._update_call(
            clip_grad_norm=clip_grad_norm, nonfinite=nonfinite, name=name,
            max_staleness=max_staleness, staleness=staleness, hyperparameters=hyperparameters,
            ttl_s=ttl_s,
        )  # fmt: skip
        return await self._client._run(call)

    async def delete(self) -> None:
        """Delete the session and all of its state on the server."""
        await self._client._run(self._delete_call())

    async def push(
        self,
        grads: Mapping[str, np.ndarray],
        *,
        base_version: int | _Unset | None = UNSET,
        worker: str | None = None,
        returning: Returning = "all",
        idempotency_key: str | None = None,
    ) -> dict[str, np.ndarray]:
        """One optimizer step; returns the updated params (see Session.push).

        With several pushes in flight on one handle, `last_push` is whichever answered last.
        """
        call = self._push_call(
            grads, base_version=base_version, worker=worker, returning=returning,
            idempotency_key=idempotency_key,
        )  # fmt: skip
        return (await self._client._run(call)).params

    async def pull(
        self,
        names: str | Iterable[str] | None = None,
        *,
        after_version: int | None = None,
        wait_s: float | None = None,
    ) -> dict[str, np.ndarray]:
        """Current params; with `wait_s` a long poll (see Session.pull)."""
        call = self._pull_call(names, after_version=after_version, wait_s=wait_s)
        pulled = await self._client._run(call)
        if pulled.params is None:
            plain = self._pull_call(names, after_version=None, wait_s=None)
            pulled = await self._client._run(plain)
        return pulled.params

    async def put_params(
        self, params: Mapping[str, np.ndarray], *, if_match: int | None = None
    ) -> int:
        """Replace parameter values (optimizer state untouched); returns the new version."""
        return await self._client._run(self._put_params_call(params, if_match=if_match))

    async def state(self) -> dict[str, Any]:
        """The full optimizer state (a checkpoint)."""
        return await self._client._run(self._state_call())

    async def load_state(
        self, document: Mapping[str, Any], *, if_match: int | None = None
    ) -> int:
        """Restore a `state()` document; returns the new version."""
        return await self._client._run(self._load_state_call(document, if_match=if_match))
