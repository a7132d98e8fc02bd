"""What the sync and the async client share: everything except sending bytes and sleeping.

Each API operation is a `Call`: a fully built `httpx.Request` (URL, auth, codec headers, body,
idempotency key) plus the function that reads its success response. `Client` runs a call with
`httpx.Client.send`, `AsyncClient` runs the very same call with `await httpx.AsyncClient.send`.
Request building, auth, codec choice, error mapping, decoding and every retry decision
(`RetryPolicy`, `Attempts`) are written once, here, as httpx itself does with its `BaseClient`
(DESIGN.md, "Examples to follow"); the twins only loop: send, ask `Attempts`, sleep or finish.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any, Final, Generic, Literal, TypeVar
from urllib.parse import quote

import httpx
import numpy as np

from ._state import decode_state, encode_state
from ._version import __version__
from ._wire import CODECS, JSON, SAFETENSORS, decode_message, dumps, encode_message, loads
from .errors import OptservError

T = TypeVar("T")
U = TypeVar("U")

Returning = Literal["all", "pushed", "none"]
Shape = int | Sequence[int]

RETURNING: Final = ("all", "pushed", "none")
#: Sessions fetched per request when list_sessions() walks every page (the server's maximum).
LIST_PAGE: Final = 1000
#: How a call may be retried: "safe" after any transport failure or a 503 (the call is
#: idempotent, or carries an Idempotency-Key), "unsent" only when the request surely never left
#: (the connection could not be made), so a non-idempotent create is never sent twice.
RetryScope = Literal["safe", "unsent"]


class _Unset:
    """Means "leave as it is" where None has a meaning (clip_grad_norm=None turns clipping off)."""

    def __repr__(self) -> str:
        return "UNSET"


UNSET: Final = _Unset()


# -- retries --------------------------------------------------------------------------------------

#: Transport failures after which the request surely never reached the server.
_UNSENT_ERRORS: Final = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)
#: Transport failures worth another try: the network or the server, not a bug on our side
#: (LocalProtocolError, UnsupportedProtocol and the like are never retried).
_TRANSIENT_ERRORS: Final = (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How often and how patiently a client retries a failed call.

    `attempts` counts every try, the first included (1 = never retry). Before retry n the client
    waits `backoff * 2**(n-1)` seconds, at most `max_backoff`, shortened at random by up to
    `jitter` of itself so that many workers do not retry in step. A 503 or a 429 (rate limited:
    refused before anything ran, so any call is retried) with `Retry-After` waits at least that
    long (but never more than `max_backoff`).
    """

    attempts: int = 5
    backoff: float = 0.1
    max_backoff: float = 5.0
    jitter: float = 0.5

    def __post_init__(self) -> None:
        if isinstance(self.attempts, bool) or not isinstance(self.attempts, int):
            raise TypeError(f"attempts must be an int, not {self.attempts!r}")
        if self.attempts < 1:
            raise ValueError(f"attempts counts the first try too: at least 1, not {self.attempts}")
        if not (self.backoff >= 0 and self.max_backoff >= 0):
            raise ValueError("backoff and max_backoff must be non-negative")
        if not 0 <= self.jitter <= 1:
            raise ValueError(f"jitter is a fraction in [0, 1], not {self.jitter!r}")

    @classmethod
    def of(cls, retries: RetryPolicy | int | None) -> RetryPolicy:
        """What a client's `retries=` means: a policy, a number of retries, or None/0 for none."""
        if isinstance(retries, RetryPolicy):
            return retries
        if retries is None:
            return cls(attempts=1)
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            raise ValueError(f"retries is a RetryPolicy, an int >= 0 or None, not {retries!r}")
        return cls(attempts=retries + 1)

    def delay(self, retry: int, retry_after: float | None = None) -> float:
        """Seconds to wait before retry number `retry` (1 for the first retry)."""
        wait = min(self.backoff * 2.0 ** (retry - 1), self.max_backoff)
        wait *= 1.0 - self.jitter * random.random()
        if retry_after is not None:
            wait = max(wait, min(retry_after, self.max_backoff))
        return wait


def retry_after_seconds(response: httpx.Response) -> float | None:
    """`Retry-After` in seconds (delta-seconds or an HTTP date); None if absent or unreadable."""
    value = response.headers.get("retry-after")
    if value is None:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


class Attempts(Generic[T]):
    """The retry decisions for one run of one call; the client loops, this decides.

    After each failure the client asks `after_error` / `after_response` for the seconds to wait
    before trying again, or None to stop; `finish` reads the final response.
    """

    def __init__(self, call: Call[T], policy: RetryPolicy, finish: Callable[..., T]) -> None:
        self.call = call
        self.policy = policy
        self._finish = finish
        #: requests tried so far
        self.count = 0
        #: whether an earlier attempt may have reached the server and acted
        self.maybe_applied = False

    def _next(self, retry_after: float | None = None) -> float | None:
        if self.count >= self.policy.attempts:
            return None
        return self.policy.delay(self.count, retry_after)

    def after_error(self, exc: httpx.RequestError) -> float | None:
        """Attempt `count` raised `exc`: seconds to wait before retrying, or None to give up."""
        if isinstance(exc, _UNSENT_ERRORS):
            return self._next()
        if self.call.retry == "safe" and isinstance(exc, _TRANSIENT_ERRORS):
            self.maybe_applied = True
            return self._next()
        return None

    def after_response(self, response: httpx.Response) -> float | None:
        """Attempt `count` answered: seconds to wait before retrying, or None to finish with it."""
        if response.status_code == 429:
            # Rate limited: refused before anything ran, so any call may go again.
            return self._next(retry_after_seconds(response))
        if response.status_code != 503 or self.call.retry != "safe":
            return None
        wait = self._next(retry_after_seconds(response))
        if wait is not None:
            self.maybe_applied = True  # the store may have failed after the write went through
        return wait

    def transport_error(self, exc: httpx.RequestError) -> OptservError:
        error = OptservError.from_transport(exc)
        error.attempts = self.count
        return error

    def finish(self, response: httpx.Response) -> T:
        """The result of the last response (or its OptservError, with `attempts` set)."""
        call = self.call
        if (
            self.maybe_applied
            and call.done_status is not None
            and response.status_code == call.done_status
        ):
            # e.g. DELETE: 404 on a retry means an earlier attempt (whose answer was lost) did it.
            response = httpx.Response(204, request=response.request)
        try:
            return self._finish(call, response)
        except OptservError as error:
            error.attempts = self.count
            raise


@dataclass(frozen=True, slots=True)
class Call(Generic[T]):
    """One API operation: the request to send and how to read a success response to it.

    `retry` says when the request may be sent again (see RetryScope); `done_status` is an error
    status that, after an attempt that may have acted, means that attempt already did the work.
    """

    request: httpx.Request
    parse: Callable[[httpx.Response], T]
    retry: RetryScope = "safe"
    done_status: int | None = None

    def then(self, after: Callable[[T], U]) -> Call[U]:
        """The same request with `after` applied to the parsed result (session bookkeeping)."""
        parse = self.parse
        return replace(self, parse=lambda response: after(parse(response)))


@dataclass(frozen=True, slots=True)
class PushResult:
    """Everything a push answered: the new version, whether it stepped, and the params."""

    version: int
    applied: bool
    params: dict[str, np.ndarray] = field(repr=False)
    skipped: str | None = None
    total_norm: float | None = None
    #: versions between the push's base_version and the version it was applied to (None when
    #: no base_version was sent)
    staleness: int | None = None
    #: True when the server answered a retry from its record of the first attempt
    #: (`Idempotency-Replayed`): `version`/`applied` are the first attempt's, `params` current
    replayed: bool = False
    #: the Idempotency-Key this push was sent with (on every attempt)
    idempotency_key: str | None = None


@dataclass(frozen=True, slots=True)
class Pulled:
    version: int
    #: None when a long poll ended with 304 Not Modified: nothing newer than `after_version`
    params: dict[str, np.ndarray] | None


def _check_version(version: object) -> int:
    if isinstance(version, bool) or not isinstance(version, int) or version < 0:
        raise ValueError(f"a version is a non-negative int, not {version!r}")
    return version


def _version_header(version: int) -> str:
    """If-Match wants the ETag form `"12"`."""
    return f'"{_check_version(version)}"'


def _shape_spec(name: str, shape: Shape | Mapping[str, Any]) -> dict[str, Any]:
    """`(3, 4)`, `[3, 4]`, `12` or `{"shape": [3, 4]}` -> `{"shape": [...]}`."""
    if isinstance(shape, Mapping):
        return dict(shape)
    if isinstance(shape, int):
        return {"shape": [shape]}
    try:
        return {"shape": [int(d) for d in shape]}
    except TypeError:
        raise TypeError(f"tensor {name!r}: a shape is a sequence of ints, not {shape!r}") from None


class BaseClient:
    """Connection settings plus a builder for every operation; no I/O happens here."""

    url: str
    api_key: str | None
    timeout: float | None
    codec: str
    retries: RetryPolicy

    def __init__(
        self,
        url: str,
        api_key: str | None = None,
        *,
        timeout: float | None = 60.0,
        codec: str = "safetensors",
        retries: RetryPolicy | int | None = RetryPolicy(),
    ) -> None:
        if codec not in CODECS:
            raise ValueError(f"codec must be one of {sorted(CODECS)}, not {codec!r}")
        self.url = url.rstrip("/")
        self.api_key = api_key
        self.timeout = timeout
        self.codec = codec
        self.retries = RetryPolicy.of(retries)
        self._headers = {"User-Agent": f"optserve-client/{__version__} httpx/{httpx.__version__}"}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        # JSON stays acceptable at a lower weight, so a server without safetensors still answers.
        self._accept = f"{SAFETENSORS}, {JSON};q=0.5" if codec == "safetensors" else JSON

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r}, codec={self.codec!r})"

    # -- building ---------------------------------------------------------------------------------

    def _request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, Any] | None = None,
        content: bytes | None = None,
        content_type: str | None = None,
        accept: str = JSON,
        headers: Mapping[str, str] | None = None,
        wait_s: float | None = None,
    ) -> httpx.Request:
        all_headers = {**self._headers, "Accept": accept, **(headers or {})}
        if content_type is not None:
            all_headers["Content-Type"] = content_type
        extensions: dict[str, Any] = {}
        if self.timeout is not None:
            # A long poll may legitimately hold the response for wait_s before answering.
            read = self.timeout + (wait_s or 0.0)
            extensions["timeout"] = httpx.Timeout(self.timeout, read=read).as_dict()
        return httpx.Request(
            method,
            self.url + path,
            params={k: v for k, v in (params or {}).items() if v is not None},
            headers=all_headers,
            content=content,
            extensions=extensions,
        )

    @staticmethod
    def _session_path(sid: str, suffix: str = "") -> str:
        return f"/v1/sessions/{quote(sid, safe='')}{suffix}"

    # -- reading ----------------------------------------------------------------------------------

    def _attempts(self, call: Call[T]) -> Attempts[T]:
        return Attempts(call, self.retries, self._finish)

    @staticmethod
    def _finish(call: Call[T], response: httpx.Response) -> T:
        """Map an error status to OptservError, else parse; undecodable bodies map too."""
        if response.status_code >= 400:
            raise OptservError.from_response(response)
        try:
            return call.parse(response)
        except (ValueError, TypeError, KeyError) as exc:
            raise OptservError.invalid_response(response, str(exc)) from None

    @staticmethod
    def _json(response: httpx.Response) -> Any:
        return loads(response.content)

    # -- client-level operations ------------------------------------------------------------------

    def _create_call(
        self,
        optimizer: str | Mapping[str, Any],
        params: Mapping[str, Any] | None,
        *,
        tensors: Mapping[str, Shape | Mapping[str, Any]] | None,
        lr_schedule: Mapping[str, Any] | None,
        clip_grad_norm: float | None,
        nonfinite: str,
        name: str | None,
        max_staleness: int | None,
        staleness: str | None,
        hyperparameters: Mapping[str, Any],
        ttl_s: float | None = None,
        mode: Mapping[str, Any] | None = None,
    ) -> Call[dict[str, Any]]:
        if isinstance(optimizer, str):
            spec: dict[str, Any] = {"name": optimizer, **hyperparameters}
        else:
            spec = {**optimizer, **hyperparameters}
        fields: dict[str, Any] = {"optimizer": spec, "nonfinite": nonfinite}
        if tensors:
            fields["tensors"] = {n: _shape_spec(n, s) for n, s in tensors.items()}
        optional = {
            "lr_schedule": lr_schedule, "clip_grad_norm": clip_grad_norm, "name": name,
            "max_staleness": max_staleness, "staleness": staleness, "ttl_s": ttl_s,
            "mode": mode,
        }  # fmt: skip
        fields.update({key: value for key, value in optional.items() if value is not None})
        content, content_type = encode_message(self.codec, "params", params or {}, fields)
        request = self._request("POST", "/v1/sessions", content=content, content_type=content_type)
        # Not idempotent and the server takes no key for it: a create whose answer was lost may
        # have made a session, so it is only retried when it surely never left.
        return Call(request, self._json, retry="unsent")

    def _session_call(self, sid: str) -> Call[dict[str, Any]]:
        return Call(self._request("GET", self._session_path(sid)), self._json)

    def _list_call(self, offset: int, limit: int) -> Call[list[dict[str, Any]]]:
        request = self._request("GET", "/v1/sessions", params={"offset": offset, "limit": limit})
        return Call(request, lambda response: list(self._json(response)["sessions"]))


class BaseSession:
    """A handle on one server session: its id, the last version seen, the last push's answer.

    Builds the per-session calls; each call's parse also updates `version` (and `last_push`),
    so the sync and async twins keep the same bookkeeping without repeating it.
    """

    _client: BaseClient
    id: str
    version: int
    last_push: PushResult | None

    def __init__(self, client: BaseClient, sid: str, version: int = 0) -> None:
        self._client = client
        self.id = sid
        self.version = version
        self.last_push = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(id={self.id!r}, version={self.version})"

    def _seen(self, version: int) -> int:
        """Record a version this handle saw; answers may arrive out of order (concurrent async
        calls, a replayed push), and the server's version only grows, so keep the newest."""
        self.version = max(self.version, version)
        return version

    def _path(self, suffix: str = "") -> str:
        return self._client._session_path(self.id, suffix)

    # -- session resource -------------------------------------------------------------------------

    def _info_call(self) -> Call[dict[str, Any]]:
        return self._client._session_call(self.id).then(self._seen_info)

    def _seen_info(self, info: dict[str, Any]) -> dict[str, Any]:
        self._seen(int(info["version"]))
        return info

    def _update_call(
        self,
        *,
        clip_grad_norm: float | _Unset | None,
        nonfinite: str | _Unset,
        name: str | _Unset | None,
        max_staleness: int | _Unset | None,
        staleness: str | _Unset,
        hyperparameters: Mapping[str, Any],
        ttl_s: float | _Unset | None = UNSET,
    ) -> Call[dict[str, Any]]:
        changes: dict[str, Any] = {}
        if hyperparameters:
            changes["optimizer"] = dict(hyperparameters)
        for key, value in (("clip_grad_norm", clip_grad_norm), ("nonfinite", nonfinite),
                           ("name", name), ("max_staleness", max_staleness),
                           ("staleness", staleness), ("ttl_s", ttl_s)):  # fmt: skip
            if value is not UNSET:
                changes[key] = value
        request = self._client._request(
            "PATCH", self._path(), content=dumps(changes), content_type=JSON
        )
        return Call(request, self._client._json).then(self._seen_info)

    def _delete_call(self) -> Call[None]:
        # A 404 after an attempt that may have acted: that attempt deleted it.
        request = self._client._request("DELETE", self._path())
        return Call(request, lambda response: None, done_status=404)

    # -- tensors ----------------------------------------------------------------------------------

    def _push_call(
        self,
        grads: Mapping[str, Any],
        *,
        base_version: int | _Unset | None,
        worker: str | None,
        returning: Returning,
        idempotency_key: str | None,
    ) -> Call[PushResult]:
        if returning not in RETURNING:
            raise ValueError(f"returning must be one of {RETURNING}, not {returning!r}")
        if base_version is UNSET:
            base_version = self.version  # the newest params this handle has seen
        elif base_version is not None:
            _check_version(base_version)
        fields = {
            k: v for k, v in (("base_version", base_version), ("worker", worker)) if v is not None
        }
        # One key per push, made before the first attempt and sent on every retry of it, so the
        # server applies a push at most once however often its answer is lost.
        key = idempotency_key if idempotency_key is not None else uuid.uuid4().hex
        client = self._client
        content, content_type = encode_message(client.codec, "grads", grads, fields)
        request = client._request(
            "POST",
            self._path("/gradients"),
            params={"return": returning},
            content=content,
            content_type=content_type,
            accept=client._accept,
            headers={"Idempotency-Key": key},
        )

        def parse(response: httpx.Response) -> PushResult:
            params, meta = decode_message(response.content, response.headers.get("content-type"),
                                          "params")  # fmt: skip
            total_norm = meta.get("total_norm")
            staleness = meta.get("staleness")
            result = PushResult(
                version=int(meta["version"]),
                applied=bool(meta["applied"]),
                params=params,
                skipped=meta.get("skipped"),
                total_norm=float(total_norm) if total_norm is not None else None,
                staleness=int(staleness) if staleness is not None else None,
                replayed=response.headers.get("idempotency-replayed", "").lower() == "true",
                idempotency_key=key,
            )
            self._seen(result.version)
            self.last_push = result
            return result

        return Call(request, parse)

    def _pull_call(
        self,
        names: str | Iterable[str] | None,
        *,
        after_version: int | None,
        wait_s: float | None,
    ) -> Call[Pulled]:
        if isinstance(names, str):
            names = [names]
        if wait_s is not None and after_version is None:
            after_version = self.version  # "wait for anything newer than what I have"
        query = {
            "names": ",".join(names) if names is not None else None,
            "after_version": after_version,
            "wait_s": wait_s,
        }
        client = self._client
        request = client._request(
            "GET", self._path("/params"), params=query, accept=client._accept, wait_s=wait_s
        )

        def parse(response: httpx.Response) -> Pulled:
            if response.status_code == 304:  # the long poll's deadline: nothing newer arrived
                return Pulled(self._seen(int(response.headers["etag"].strip('W/"'))), None)
            params, meta = decode_message(response.content, response.headers.get("content-type"),
                                          "params")  # fmt: skip
            return Pulled(self._seen(int(meta["version"])), params)

        return Call(request, parse)

    def _put_params_call(self, params: Mapping[str, Any], *, if_match: int | None) -> Call[int]:
        client = self._client
        content, content_type = encode_message(client.codec, "params", params, {})
        headers = {"If-Match": _version_header(if_match)} if if_match is not None else None
        request = client._request(
            "PUT", self._path("/params"), content=content, content_type=content_type,
            headers=headers,
        )  # fmt: skip
        return Call(request, self._parse_version)

    def _parse_version(self, response: httpx.Response) -> int:
        return self._seen(int(self._client._json(response)["version"]))

    # -- optimizer state --------------------------------------------------------------------------

    def _state_call(self) -> Call[dict[str, Any]]:
        client = self._client
        request = client._request("GET", self._path("/state"), accept=client._accept)

        def parse(response: httpx.Response) -> dict[str, Any]:
            document = decode_state(response.content, response.headers.get("content-type"))
            if "version" in document:
                self._seen(int(document["version"]))
            return document

        return Call(request, parse)

    def _load_state_call(self, document: Mapping[str, Any], *, if_match: int | None) -> Call[int]:
        client = self._client
        content, content_type = encode_state(document, client.codec)
        headers = {"If-Match": _version_header(if_match)} if if_match is not None else None
        request = client._request(
            "PUT", self._path("/state"), content=content, content_type=content_type,
            headers=headers,
        )  # fmt: skip
        return Call(request, self._parse_version)
