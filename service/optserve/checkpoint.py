"""`optserve checkpoint save SESSION FILE` and `optserve checkpoint load FILE`.

A checkpoint is one safetensors file (readable by the `safetensors` package and by torch):
`param/<tensor>` holds a tensor's values and `state/<tensor>/<state name>` each optimizer state
array (torch's names: exp_avg, exp_avg_sq, momentum_buffer, ...), all float32. The header's
metadata (string -> string; structured values are JSON) holds everything else a session needs to
continue bit-identically: `optimizer` (name and every hyperparameter), `lr_schedule` and
`lr_schedule_state`, `scalars` (per tensor `step`, and NAdam's `mu_product`), `clip_grad_norm`,
`nonfinite`, `mode`, `max_staleness`, `staleness`, `name`, `ttl_s`, the session `version`,
`source_session`, `created_at`, `format` and `format_version`.

The tool talks to a running server over its HTTP API (`--url`, `--api-key`) rather than to
Redis, because:
- it works against any deployment the way workers do (docker compose exposes only HTTP; the
  embedded store is locked by the server that runs it);
- the server stays the only writer: a restore goes through the same validation, compare-and-set
  commit and tenant checks as any import, and a save reads one consistent snapshot (GET state);
- the HTTP state document is already the server's checkpoint format (GET/PUT state), so this
  module only maps it to and from a file, with the server's own codec (api/state_wire.py).

Restore: create a session with the saved settings, then PUT the state with `adopt_version`, so
the new session continues at the saved version (a checkpoint of a never-updated session, version
0, restores at version 1: versions never repeat). If the import fails the new session is deleted.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from . import __version__
from .api.state_wire import decode_state, encode_state
from .wire import JSON, SAFETENSORS

FORMAT = "optserve-checkpoint"
FORMAT_VERSION = 1
#: Session settings saved beside the state and given back when a session is created from it.
SETTINGS = ("name", "mode", "clip_grad_norm", "nonfinite", "max_staleness", "staleness", "ttl_s")
#: The view's fields that must not change between the reads of one save (a PATCH in between).
_STABLE = (*SETTINGS, "optimizer", "lr_schedule", "tensors")
_SAVE_ATTEMPTS = 5


class CheckpointError(Exception):
    """A failure to report on stderr (the server's problem detail, or a bad file)."""


class Api:
    """The few HTTP calls a checkpoint needs (stdlib only: the server package carries no HTTP
    client, and these are five plain requests)."""

    def __init__(self, url: str, api_key: str | None = None, timeout: float = 300.0) -> None:
        self.url = url.rstrip("/")
        self.api_key = api_key
        self.timeout = timeout

    def call(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        content_type: str = JSON,
        accept: str = JSON,
    ) -> bytes:
        headers = {"Accept": accept}
        if body is not None:
            headers["Content-Type"] = content_type
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.url + path, body, headers, method=method)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return response.read()
        except urllib.error.HTTPError as error:
            raise CheckpointError(_problem(error)) from None
        except urllib.error.URLError as error:
            raise CheckpointError(f"cannot reach {self.url}: {error.reason}") from None

    def json(self, method: str, path: str, document: Any = None) -> Any:
        body = None if document is None else json.dumps(document).encode()
        return json.loads(self.call(method, path, body) or b"null")


def _problem(error: urllib.error.HTTPError) -> str:
    """`<status> <code>: <detail>` from a problem+json body, or the raw status."""
    try:
        problem = json.loads(error.read())
        return f"{error.code} {problem.get('code')}: {problem.get('detail')}"
    except ValueError:
        return f"{error.code} {error.reason}"


def _session_path(sid: str) -> str:
    return f"/v1/sessions/{urllib.parse.quote(sid, safe='')}"


# -- save -----------------------------------------------------------------------------------------


def read_checkpoint_from(api: Api, sid: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(session view, exported state) that belong together: the view is read before and after
    the state, and all three reads are repeated if the session's settings changed in between."""
    for _ in range(_SAVE_ATTEMPTS):
        before = api.json("GET", _session_path(sid))
        body = api.call("GET", f"{_session_path(sid)}/state", accept=SAFETENSORS)
        after = api.json("GET", _session_path(sid))
        if all(before[k] == after[k] for k in _STABLE):
            return after, decode_state(body, safetensors=True)
    raise CheckpointError(f"session {sid} kept changing its settings; try again")


def to_file(view: dict[str, Any], state: dict[str, Any], path: Path) -> dict[str, str]:
    """Write the checkpoint atomically (a temporary file renamed over `path`); its metadata."""
    arrays: dict[str, np.ndarray] = {}
    scalars: dict[str, dict[str, float]] = {}
    for tensor, entry in state["tensors"].items():
        for key, value in entry.items():
            if isinstance(value, np.ndarray):
                name = f"param/{tensor}" if key == "param" else f"state/{tensor}/{key}"
                arrays[name] = np.ascontiguousarray(value, dtype="<f4")
            else:
                scalars.setdefault(tensor, {})[key] = float(value)
    metadata = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "optserve_version": __version__,
        "source_session": view["id"],
        "created_at": datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "version": str(state["version"]),
        "optimizer": json.dumps(state["optimizer"]),
        "lr_schedule": json.dumps(state.get("lr_schedule")),
        "lr_schedule_state": json.dumps(state["lr_schedule_state"]),
        "scalars": json.dumps(scalars),
        **{key: json.dumps(view[key]) for key in SETTINGS},
    }
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent or Path("."))
    os.close(fd)
    try:
        save_file(arrays, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return metadata


def save(api: Api, sid: str, path: Path) -> dict[str, str]:
    view, state = read_checkpoint_from(api, sid)
    return to_file(view, state, path)


# -- load -----------------------------------------------------------------------------------------


def from_file(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(saved settings, state document as GET state exports it) from a checkpoint file."""
    try:
        with safe_open(str(path), framework="np") as handle:
            metadata = handle.metadata() or {}
        arrays = load_file(str(path))
    except Exception as error:  # OSError, or the package's own error types
        raise CheckpointError(f"{path}: not a readable safetensors file ({error})") from None
    if metadata.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not an optserve checkpoint (no format={FORMAT!r})")
    if int(metadata.get("format_version", "0")) > FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format {metadata['format_version']} is newer than this "
            f"optserve understands ({FORMAT_VERSION})"
        )
    tensors: dict[str, dict[str, Any]] = {}
    for name, array in arrays.items():
        kind, _, rest = name.partition("/")
        if kind == "param" and rest:
            tensors.setdefault(rest, {})["param"] = array
        elif kind == "state" and "/" in rest:
            tensor, _, key = rest.rpartition("/")  # state names never contain "/"
            tensors.setdefault(tensor, {})[key] = array
        else:
            raise CheckpointError(f"{path}: unexpected tensor {name!r}")
    for tensor, values in json.loads(metadata["scalars"]).items():
        tensors.setdefault(tensor, {}).update(values)
    state = {
        "version": int(metadata["version"]),
        "optimizer": json.loads(metadata["optimizer"]),
        "lr_schedule": json.loads(metadata["lr_schedule"]),
        "lr_schedule_state": json.loads(metadata["lr_schedule_state"]),
        "tensors": tensors,
    }
    settings = {key: json.loads(metadata[key]) for key in SETTINGS if key in metadata}
    return settings, state


def load(
    api: Api, path: Path, *, name: str | None = None, ttl_s: float | None = None
) -> dict[str, Any]:
    """Create a new session from the checkpoint; returns the server's view of it."""
    settings, state = from_file(path)
    if name is not None:
        settings["name"] = name
    if ttl_s is not None:
        settings["ttl_s"] = ttl_s
    shapes = {}
    for tensor, entry in state["tensors"].items():
        if "param" not in entry:
            raise CheckpointError(f"{path}: tensor {tensor!r} has no param/{tensor}")
        shapes[tensor] = {"shape": list(entry["param"].shape)}
    if settings.get("ttl_s") is None:
        settings.pop("ttl_s", None)  # saved without expiry: the server's default applies
    create = {
        **settings,
        "optimizer": state["optimizer"],
        "lr_schedule": state["lr_schedule"],
        "tensors": shapes,  # zeros for now: the state import below writes the params
    }
    session = api.json("POST", "/v1/sessions", create)
    sid = session["id"]
    body, _ = encode_state(state, SAFETENSORS)
    query = "?adopt_version=true" if state["version"] > 0 else ""
    try:
        api.call("PUT", f"{_session_path(sid)}/state{query}", body, SAFETENSORS)
    except BaseException:
        with contextlib.suppress(CheckpointError):  # the import's error is the one to report
            api.call("DELETE", _session_path(sid))
        raise
    return api.json("GET", _session_path(sid))


# -- command line ---------------------------------------------------------------------------------


def add_parser(commands: argparse._SubParsersAction) -> None:
    """`optserve checkpoint save|load` (cli.py calls this)."""
    parser = commands.add_parser("checkpoint", help="save a session to a file, or load one")
    actions = parser.add_subparsers(dest="action", required=True)
    save_parser = actions.add_parser("save", help="write SESSION's params and state to FILE")
    save_parser.add_argument("session", help="session id")
    save_parser.add_argument("file", type=Path, help="the safetensors file to write")
    load_parser = actions.add_parser("load", help="create a new session from FILE; prints its id")
    load_parser.add_argument("file", type=Path, help="a file written by `checkpoint save`")
    load_parser.add_argument("--name", help="the new session's name (default: the saved one)")
    load_parser.add_argument(
        "--ttl-s", type=float, help="the new session's idle TTL (default: the saved one)"
    )
    for sub in (save_parser, load_parser):
        sub.add_argument(
            "--url",
            default=os.environ.get("OPTSERVE_URL", "http://127.0.0.1:8000"),
            help="the server (default: OPTSERVE_URL or http://127.0.0.1:8000)",
        )
        sub.add_argument(
            "--api-key",
            default=os.environ.get("OPTSERVE_API_KEY"),
            help="bearer token (default: OPTSERVE_API_KEY)",
        )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    api = Api(args.url, args.api_key)
    try:
        if args.action == "save":
            metadata = save(api, args.session, args.file)
            print(f"saved session {args.session} at version {metadata['version']} to {args.file}")
        else:
            session = load(api, args.file, name=args.name, ttl_s=args.ttl_s)
            print(session["id"])
    except CheckpointError as error:
        print(f"optserve checkpoint {args.action}: {error}", file=sys.stderr)
        sys.exit(1)
