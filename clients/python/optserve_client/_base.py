"""What the sync client and a future async client share: everything except sending bytes.

Each API operation is a `Call`: a fully built `httpx.Request` (URL, auth, codec headers, body)
plus the function that reads its success response. `Client` runs a call with
`httpx.Client.send`; an `AsyncClient` will run the very same calls with `await
httpx.AsyncClient.send`. Request building, auth, codec choice, error mapping and decoding are
written once, here, as httpx itself does with its `BaseClient` (DESIGN.md, "Examples to follow").
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
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


class _Unset:
    """Means "leave as it is" where None has a meaning (clip_grad_norm=None turns clipping off)."""

    def __repr__(self) -> str:
        return "UNSET"


UNSET: Final = _Unset()


@dataclass(frozen=True, slots=True)
class Call(Generic[T]):
    """One API operation: the request to send and how to read a success response to it."""

    request: httpx.Request
    parse: Callable[[httpx.Response], T]

    def then(self, after: Callable[[T], U]) -> Call[U]:
        """The same request with `after` applied to the parsed result (session bookkeeping)."""
        parse = self.parse
        return Call(self.request, lambda response: after(parse(response)))


@dataclass(frozen=True, slots=True)
class PushResult:
    """Everything a push answered: the new version, whether it stepped, and the params."""

    version: int
    applied: bool
    params: dict[str, np.ndarray] = field(repr=False)
    skipped: str | None = None
    total_norm: float | None = None


@dataclass(frozen=True, slots=True)
class Pulled:
    version: int
    #: None when a long poll ended with 304 Not Modified: nothing newer than `after_version`
    params: dict[str, np.ndarray] | None


def _version_header(version: int) -> str:
    """If-Match wants the ETag form `"12"`."""
    if isinstance(version, bool) or not isinstance(version, int) or version < 0:
        raise ValueError(f"a version is a non-negative int, not {version!r}")
    return f'"{version}"'


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

    def __init__(
        self,
        url: str,
        api_key: str | None = None,
        *,
        timeout: float | None = 60.0,
        codec: str = "safetensors",
    ) -> None:
        if codec not in CODECS:
            raise ValueError(f"codec must be one of {sorted(CODECS)}, not {codec!r}")
        self.url = url.rstrip("/")
        self.api_key = api_key
        self.timeout = timeout
        self.codec = codec
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
        hyperparameters: Mapping[str, Any],
    ) -> Call[dict[str, Any]]:
        if isinstance(optimizer, str):
            spec: dict[str, Any] = {"name": optimizer, **hyperparameters}
        else:
            spec = {**optimizer, **hyperparameters}
        fields: dict[str, Any] = {"optimizer": spec, "nonfinite": nonfinite}
        if tensors:
            fields["tensors"] = {n: _shape_spec(n, s) for n, s in tensors.items()}
        optional = {"lr_schedule": lr_schedule, "clip_grad_norm": clip_grad_norm, "name": name}
        fields.update({key: value for key, value in optional.items() if value is not None})
        content, content_type = encode_message(self.codec, "params", params or {}, fields)
        request = self._request("POST", "/v1/sessions", content=content, content_type=content_type)
        return Call(request, self._json)

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
        self.version = version
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
        hyperparameters: Mapping[str, Any],
    ) -> Call[dict[str, Any]]:
        changes: dict[str, Any] = {}
        if hyperparameters:
            changes["optimizer"] = dict(hyperparameters)
        for key, value in (("clip_grad_norm", clip_grad_norm), ("nonfinite", nonfinite),
                           ("name", name)):  # fmt: skip
            if value is not UNSET:
                changes[key] = value
        request = self._client._request(
            "PATCH", self._path(), content=dumps(changes), content_type=JSON
        )
        return Call(request, self._client._json).then(self._seen_info)

    def _delete_call(self) -> Call[None]:
        return Call(self._client._request("DELETE", self._path()), lambda response: None)

    # -- tensors ----------------------------------------------------------------------------------

    def _push_call(
        self,
        grads: Mapping[str, Any],
        *,
        base_version: int | None,
        worker: str | None,
        returning: Returning,
    ) -> Call[PushResult]:
        if returning not in RETURNING:
            raise ValueError(f"returning must be one of {RETURNING}, not {returning!r}")
        fields = {
            k: v for k, v in (("base_version", base_version), ("worker", worker)) if v is not None
        }
        client = self._client
        content, content_type = encode_message(client.codec, "grads", grads, fields)
        request = client._request(
            "POST",
            self._path("/gradients"),
            params={"return": returning},
            content=content,
            content_type=content_type,
            accept=client._accept,
        )

        def parse(response: httpx.Response) -> PushResult:
            params, meta = decode_message(response.content, response.headers.get("content-type"),
                                          "params")  # fmt: skip
            total_norm = meta.get("total_norm")
            result = PushResult(
                version=int(meta["version"]),
                applied=bool(meta["applied"]),
                params=params,
                skipped=meta.get("skipped"),
                total_norm=float(total_norm) if total_norm is not None else None,
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
