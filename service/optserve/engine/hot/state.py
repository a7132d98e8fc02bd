"""A hot session's in-memory state and the replay that rebuilds it from snapshot + log.

Replay runs the very function a live push runs (`apply_update`, same kernels, same order, the
lr and schedule the log recorded, the config in force at that point of the log), on the
snapshot's exact float32 bytes, so the recovered params and state are bit-identical to the
owner's, and replaying the same log twice gives the same bytes.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson

from ...optim import TensorState
from ...optim.schedules import ScheduleState
from ...optim.update import apply_update
from ...store.hot_log import Holder, LogEntry
from ..arrays import array_from_bytes, state_from_fields, state_to_fields, to_bytes
from ..session_config import SessionConfig


class CorruptLog(RuntimeError):
    """The log does not continue the snapshot (a bug or a hand-edited store): never guess."""


@dataclass
class HotSession:
    """Everything a session's owner keeps in memory, at `version` (all of it acknowledged
    except while the applier holds `lock` between a step and its log append)."""

    sid: str
    holder: Holder
    config: SessionConfig
    schedule: ScheduleState
    version: int
    params: dict[str, np.ndarray]
    states: dict[str, TensorState]
    #: the stored snapshot: its version and each tensor's stored arrays (chunk counts)
    snap_version: int
    manifests: dict[str, dict[str, int]]
    #: the newest log entry id (what the next snapshot covers)
    last_id: str = "0-0"
    #: log entries since the snapshot: (id, its gradient keys), trimmed with the next snapshot
    logged: list[tuple[str, list[str]]] = field(default_factory=list)
    snapshot_at: float = field(default_factory=time.monotonic)
    used_at: float = field(default_factory=time.monotonic)
    #: until when this process may serve from memory without hearing from Redis (monotonic)
    lease_until: float = 0.0
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    #: serialises snapshot writes (taken before `lock`): an older snapshot never lands last
    snap_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    snapshot_task: asyncio.Task | None = None
    #: set when the session left this process (lease lost, append failed): never serve it again
    lost: bool = False
    #: the session's idle TTL (None: it never expires); every use renews all its keys
    ttl_ms: int | None = None

    def snapshot_arrays(self) -> dict[str, dict[str, Any]]:
        """Copies of every param and state array as the store writes them (under the lock)."""
        return {
            name: {
                "param": to_bytes(self.params[name].copy()),
                **state_to_fields({k: np.copy(v) for k, v in self.states.get(name, {}).items()}),
            }
            for name in self.config.tensors
        }

    def snapshot_field(self, version: int | None = None, last_id: str | None = None) -> str:
        return orjson.dumps(
            {
                "version": self.version if version is None else version,
                "log_id": self.last_id if last_id is None else last_id,
                "config": self.config.to_json(),
                "schedule": self.schedule.to_dict(),
            }
        ).decode()


def decode_snapshot(
    config: SessionConfig,
    arrays: Mapping[tuple[str, str], list[bytes]],
    manifests: Mapping[str, Mapping[str, int]],
) -> tuple[dict[str, np.ndarray], dict[str, TensorState]]:
    """The snapshot's params and states as arrays, in the session's tensor order."""
    params: dict[str, np.ndarray] = {}
    states: dict[str, TensorState] = {}
    for name, shape in config.tensors.items():
        params[name] = array_from_bytes(arrays[(name, "param")], shape)
        fields = {f: arrays[(name, f)] for f in manifests.get(name, {}) if f != "param"}
        if fields:
            states[name] = state_from_fields(fields, shape)
    return params, states


def replay(session: HotSession, entries: list[LogEntry]) -> None:
    """Apply log entries to the session in place, exactly as they were applied live."""
    for entry in entries:
        if entry.kind == "config":
            session.config = SessionConfig.from_json(orjson.loads(entry.fields["config"]))
            session.schedule = ScheduleState.from_dict(orjson.loads(entry.fields["schedule"]))
            if entry.version != session.version:
                raise CorruptLog(
                    f"{session.sid}: config entry at {entry.version}, session at {session.version}"
                )
        elif entry.kind == "push":
            if entry.version != session.version + 1:
                raise CorruptLog(
                    f"{session.sid}: push entry {entry.version} after {session.version}"
                )
            config = session.config
            grads = {
                name: array_from_bytes(parts, config.tensors[name])
                for name, parts in entry.grads.items()
            }
            apply_update(
                config.algorithm,
                config.hyperparameters,
                session.params,
                grads,
                session.states,
                float(entry.fields["lr"]),
                max_norm=config.clip_grad_norm,
            )
            session.schedule = ScheduleState.from_dict(orjson.loads(entry.fields["schedule"]))
            session.version = entry.version
        else:
            raise CorruptLog(f"{session.sid}: unknown log entry kind {entry.kind!r}")
        session.last_id = entry.id
        session.logged.append((entry.id, entry.array_keys(session.sid)))
