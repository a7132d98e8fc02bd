"""The synchronous client: `_base` builds and reads every call, this module only sends them."""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from types import TracebackType
from typing import Any, TypeVar

import httpx
import numpy as np

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
from ._transport import StdlibTransport, plain_http

__all__ = ["Client", "Session"]

T = TypeVar("T")


class Client(BaseClient):
    """A connection to one optserve server.

    `codec="safetensors"` (default) moves tensors as raw float32 bytes both ways, about 5x
    smaller than JSON and with NaN/inf intact; `codec="json"` is for debugging or proxies that
    only pass JSON. Every failure raises OptservError. Use as a context manager, or call close().

    `retries` (a RetryPolicy, a number of retries, or None/0 for none) retries a call after a
    transport failure (refused, reset or dropped connection, timeout), a 503 (waiting for
    `Retry-After`) or a 429 (rate limited: nothing ran, so any call), never after another error
    status. Pushes carry one Idempotency-Key over all
    their attempts, so a retried push is applied at most once; reads, PUT, PATCH and DELETE are
    idempotent; create_session is retried only when its connection could not even be made.
    """

    def __init__(
        self,
        url: str,
        api_key: str | None = None,
        *,
        timeout: float | None = 60.0,
        codec: str = "safetensors",
        retries: RetryPolicy | int | None = RetryPolicy(),  # noqa: B008 - frozen, so shareable
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        super().__init__(url, api_key, timeout=timeout, codec=codec, retries=retries)
        # plain http:// on the standard library's HTTP (about 0.6x httpx's CPU per large tensor,
        # see _transport.py); https://, a proxy and a transport given here: httpx's own
        mounts = {"http://": StdlibTransport()} if plain_http(transport) else None
        self._http = httpx.Client(transport=transport, mounts=mounts, timeout=timeout)

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Release pooled connections."""
        self._http.close()

    def _run(self, call: Call[T]) -> T:
        """The only I/O: send one built request until `Attempts` says stop; errors map to
        OptservError. AsyncClient._run is this loop with `await`."""
        attempts = self._attempts(call)
        while True:
            attempts.count += 1
            try:
                response = self._http.send(call.request)
            except httpx.RequestError as exc:
                wait = attempts.after_error(exc)
                if wait is None:
                    raise attempts.transport_error(exc) from exc
            else:
                wait = attempts.after_response(response)
                if wait is None:
                    return attempts.finish(response)
            time.sleep(wait)

    def create_session(
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
    ) -> Session:
        """Create a session and return a handle on it.

        `optimizer` is torch's name ("adam") with hyperparameters as keywords, or the whole
        `{"name": "adam", "lr": 1e-3}` object; `params` are initial values (cast to float32),
        `tensors` names zero-initialised tensors by shape, so large ones need not be uploaded.
        `max_staleness=K` refuses pushes whose base_version is more than K behind (409
        `stale_gradient`), or with `staleness="scale"` applies them with lr / (1 + staleness).
        `ttl_s` deletes the session once it goes that many seconds unused (any use renews it).
        `mode={"type": "sync", "workers": 4}` gathers pushes into rounds of 4 whose mean gradient
        is applied once (each push then waits for its round); the default is async.
        """
        call = self._create_call(
            optimizer, params, tensors=tensors, lr_schedule=lr_schedule,
            clip_grad_norm=clip_grad_norm, nonfinite=nonfinite, name=name,
            max_staleness=max_staleness, staleness=staleness, hyperparameters=hyperparameters,
            ttl_s=ttl_s, mode=mode,
        )  # fmt: skip
        info = self._run(call)
        return Session(self, info["id"], int(info["version"]))

    def session(self, sid: str) -> Session:
        """Join an existing session (one GET, so a wrong id fails here, not at the first push)."""
        info = self._run(self._session_call(sid))
        return Session(self, info["id"], int(info["version"]))

    def list_sessions(self, *, offset: int = 0, limit: int | None = None) -> list[dict[str, Any]]:
        """Session descriptions; `limit=None` walks every page the server has."""
        if limit is not None:
            return self._run(self._list_call(offset, limit))
        sessions: list[dict[str, Any]] = []
        while True:
            page = self._run(self._list_call(offset + len(sessions), LIST_PAGE))
            sessions.extend(page)
            if len(page) < LIST_PAGE:
                return sessions


class Session(BaseSession):
    """One training session on the server; `version` is the last version this handle saw."""

    _client: Client

    def info(self) -> dict[str, Any]:
        """The session as the server has it now: version, every hyperparameter, tensors, lr."""
        return self._client._run(self._info_call())

    def update(
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
        """Change hyperparameters in flight (`update(lr=1e-4)`); returns the session info.

        `clip_grad_norm=None` turns clipping off, `max_staleness=None` accepts any staleness,
        `name=None` clears the name and `ttl_s=None` makes the session never expire, so leaving
        a keyword out is what keeps it unchanged.
        """
        call = self._update_call(
            clip_grad_norm=clip_grad_norm, nonfinite=nonfinite, name=name,
            max_staleness=max_staleness, staleness=staleness, hyperparameters=hyperparameters,
            ttl_s=ttl_s,
        )  # fmt: skip
        return self._client._run(call)

    def delete(self) -> None:
        """Delete the session and all of its state on the server.

        A retry that finds the session gone after an attempt whose answer was lost counts as
        done (that attempt deleted it).
        """
        self._client._run(self._delete_call())

    def push(
        self,
        grads: Mapping[str, np.ndarray],
        *,
        base_version: int | _Unset | None = UNSET,
        worker: str | None = None,
        returning: Returning = "all",
        idempotency_key: str | None = None,
    ) -> dict[str, np.ndarray]:
        """One optimizer step with these gradients; returns the updated params.

        Tensors left out are skipped, as torch skips grad=None. `returning="pushed"` sends back
        only the pushed tensors, `"none"` nothing. The full answer (applied, skipped,
        total_norm, staleness, replayed) is in `last_push`.

        `base_version`, the version the gradients were computed from, is by default `version`:
        the newest version this handle has seen (from a pull, push, put_params, ...). Pass an
        int when the gradients come from older params, or None to send none (no staleness
        check). `idempotency_key` defaults to a fresh uuid4, the same on every retry; a key of
        your own reused by a later call must come with the very same body (base_version too),
        else the server answers 422 `idempotency_key_reused`.
        """
        call = self._push_call(
            grads, base_version=base_version, worker=worker, returning=returning,
            idempotency_key=idempotency_key,
        )  # fmt: skip
        return self._client._run(call).params

    def pull(
        self,
        names: str | Iterable[str] | None = None,
        *,
        after_version: int | None = None,
        wait_s: float | None = None,
    ) -> dict[str, np.ndarray]:
        """Current params (all, or `names`).

        With `wait_s`, a long poll: the server answers once the version passes `after_version`
        (default: the last version this handle saw); if nothing newer came by `wait_s` (304),
        the current params are fetched and returned.
        """
        call = self._pull_call(names, after_version=after_version, wait_s=wait_s)
        pulled = self._client._run(call)
        if pulled.params is None:
            pulled = self._client._run(self._pull_call(names, after_version=None, wait_s=None))
        return pulled.params

    def put_params(self, params: Mapping[str, np.ndarray], *, if_match: int | None = None) -> int:
        """Replace parameter values (optimizer state untouched); returns the new version.

        `if_match=version` makes it conditional: OptservError 412 if the session moved on.
        """
        return self._client._run(self._put_params_call(params, if_match=if_match))

    def state(self) -> dict[str, Any]:
        """The full optimizer state (a checkpoint), with numpy arrays and float scalars."""
        return self._client._run(self._state_call())

    def load_state(self, document: Mapping[str, Any], *, if_match: int | None = None) -> int:
        """Restore a `state()` document (from this or another session); returns the version."""
        return self._client._run(self._load_state_call(document, if_match=if_match))
