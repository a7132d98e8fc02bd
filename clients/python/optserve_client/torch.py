"""`RemoteOptimizer`: a `torch.optim.Optimizer` whose state lives on an optimizer server.

>>> from optserve_client.torch import RemoteOptimizer
>>> opt = RemoteOptimizer(model.named_parameters(), url="http://127.0.0.1:8000",
...                       optimizer="adam", lr=1e-3)                # doctest: +SKIP
>>> loss.backward(); opt.step(); opt.zero_grad()                   # doctest: +SKIP

`step()` pushes every `.grad` to the session and copies the updated values back into the
parameters; hyperparameter changes in `param_groups[0]` (by hand or by a
`torch.optim.lr_scheduler`) are sent before the next push; `state_dict()` / `load_state_dict()`
speak torch's format, so a checkpoint moves between this class and a local `torch.optim.Adam`.

This is the only module of the client that imports torch (`pip install optserve-client[torch]`).
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
import torch

from ._base import UNSET
from .client import Client, Session

__all__ = ["RemoteOptimizer"]

#: The torch class behind each server optimizer name (Lion has none in torch.optim).
TORCH_CLASSES: dict[str, type[torch.optim.Optimizer]] = {
    "sgd": torch.optim.SGD,
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "rmsprop": torch.optim.RMSprop,
    "adagrad": torch.optim.Adagrad,
    "nadam": torch.optim.NAdam,
    "radam": torch.optim.RAdam,
    "adamax": torch.optim.Adamax,
}

#: torch group options about how torch runs a step on its own device; they mean nothing to the
#: server, so they stay local. Only their defaults (no graph capture, no autograd through the
#: step, no fused kernel) describe what the server computes.
LOCAL_OPTIONS = ("foreach", "capturable", "differentiable", "fused")

#: torch's state names in the order torch creates them, so exported entries read like torch's.
STATE_ORDER = ("step", "mu_product", "exp_avg", "exp_avg_sq", "max_exp_avg_sq", "exp_inf",
               "square_avg", "momentum_buffer", "grad_avg", "sum")  # fmt: skip

Closure = Callable[[], Any]


def _state_rank(key: str) -> int:
    return STATE_ORDER.index(key) if key in STATE_ORDER else len(STATE_ORDER)


@functools.cache
def _torch_group_defaults(optimizer: str) -> dict[str, Any]:
    """Every key torch puts in a param group of this optimizer, with torch's defaults."""
    cls = TORCH_CLASSES.get(optimizer)
    if cls is None:
        return {}
    probe = cls([torch.zeros(1, requires_grad=True)])
    return {k: v for k, v in probe.param_groups[0].items() if k != "params"}


def _plain(value: Any) -> Any:
    """A group value as JSON sends it: tuples as lists, 1-element tensors and numpy as numbers."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise TypeError(f"a hyperparameter tensor must hold one number, not {value.shape}")
        return value.item()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _from_server(value: Any) -> Any:
    """A hyperparameter as the server shows it -> as torch keeps it (`betas` is a tuple)."""
    return tuple(value) if isinstance(value, list) else value


def _to_numpy(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().to("cpu").contiguous().numpy()


def _state_value(key: str, value: Any) -> Any:
    """One torch state entry -> what the server's state document holds (scalars as floats)."""
    if isinstance(value, torch.Tensor):
        if value.dim() == 0:
            return float(value.item())
        return _to_numpy(value.to(torch.float32))
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)  # a legacy Python-number `step`
    raise TypeError(f"optimizer state {key!r} is a {type(value).__name__}, not a tensor")


class RemoteOptimizer(torch.optim.Optimizer):
    """A torch optimizer that steps on an optserve server.

    `params` is `model.parameters()` or `model.named_parameters()` (or one param-group dict);
    the session's tensors are named after the parameters (`"0"`, `"1"`, ... by position for
    plain parameters). Only float32 parameters and a single param group are supported.

    Without `session`, a new session is created holding the parameters' current values, with
    `optimizer` ("adam" by default; any of the server's names) and torch's hyperparameter names
    as keywords (`lr=None` means torch's default for that optimizer, 1e-3 for Adam).
    `lr_schedule` and `clip_grad_norm` are the server's own lr schedule and global-norm clipping.
    With `session=<id>`, the optimizer joins that session instead: the local parameters are
    overwritten with the session's current values; hyperparameters given as keywords are
    changed on the server (PATCH), others are taken from it.

    `step()` pushes the gradient of every parameter whose `.grad` is not None (the others are
    skipped, as torch skips them) and copies the returned values into the parameters. Changes
    to `param_groups[0]` hyperparameters since the last exchange are PATCHed first, so
    `torch.optim.lr_scheduler` schedulers work unchanged. With a server-side `lr_schedule` the
    server moves the lr itself: `param_groups[0]["lr"]` then only says what you set (it is
    refreshed by `state_dict()` and `refresh()`), and only a value you change is sent.

    Pushes go through the sync `Client` (safetensors; retried on transport errors and 503 with
    one Idempotency-Key, so a retried step is applied once). Server errors raise OptservError.
    """

    client: Client
    session: Session

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[tuple[str, torch.Tensor]] | Iterable[dict],
        url: str | None = None,
        optimizer: str | None = None,
        lr: float | None = None,
        *,
        api_key: str | None = None,
        session: str | None = None,
        name: str | None = None,
        lr_schedule: Mapping[str, Any] | None = None,
        clip_grad_norm: float | None = None,
        client: Client | None = None,
        **hyperparameters: Any,
    ) -> None:
        params = list(params)
        if params and isinstance(params[0], dict):
            if len(params) != 1:
                raise ValueError("RemoteOptimizer supports one param group, not several")
            group = dict(params[0])
            params = group.pop("params")
            params = [params] if isinstance(params, torch.Tensor) else list(params)
            lr = group.pop("lr", lr)
            group.pop("param_names", None)  # torch's own, rebuilt below
            hyperparameters = {**group, **hyperparameters}
        named = [p for p in params if isinstance(p, tuple)]
        if named and len(named) != len(params):
            raise ValueError("give all parameters with names (named_parameters()) or none")
        if named:  # split here rather than in torch, which only knows names since 2.6
            names = [str(n) for n, _ in named]
            params = [p for _, p in named]
        else:
            names = [str(i) for i in range(len(params))]
        super().__init__(params, {})
        group = self.param_groups[0]
        tensors: list[torch.Tensor] = group["params"]
        if named:
            group["param_names"] = names
        self._names: list[str] = names
        if len(set(map(id, tensors))) != len(tensors):
            raise ValueError("a parameter appears twice in the parameter list")
        for pname, param in zip(self._names, tensors, strict=True):
            if param.dtype != torch.float32:
                raise TypeError(
                    f"RemoteOptimizer supports float32 parameters only; parameter {pname!r} is "
                    f"{param.dtype}"
                )
            if param.is_sparse or param.is_complex():
                raise TypeError(f"parameter {pname!r}: only dense real tensors are supported")

        local = {k: hyperparameters.pop(k) for k in LOCAL_OPTIONS if k in hyperparameters}
        for key in ("capturable", "differentiable", "fused"):
            if local.get(key):
                raise ValueError(f"{key}=True has no meaning for a remote optimizer")
        if lr is not None:
            hyperparameters["lr"] = lr

        if client is None:
            if url is None:
                raise ValueError("give the server's url (or a client)")
            client = Client(url, api_key)
            self._owns_client = True
        else:
            self._owns_client = False
        self.client = client
        try:
            if session is None:
                self.session = client.create_session(
                    optimizer or "adam",
                    {n: _to_numpy(p) for n, p in zip(self._names, tensors, strict=True)},
                    lr_schedule=lr_schedule,
                    clip_grad_norm=clip_grad_norm,
                    name=name,
                    **{k: _plain(v) for k, v in hyperparameters.items()},
                )
                info = self.session.info()
            else:
                if lr_schedule is not None:
                    raise ValueError("lr_schedule is fixed when a session is created")
                self.session = client.session(session)
                info = self._join(optimizer, hyperparameters, clip_grad_norm, name)
        except BaseException:
            self.close()
            raise

        self.optimizer_name: str = info["optimizer"]["name"]
        self._session_tensors: dict[str, list[int]] = {
            n: list(spec["shape"]) for n, spec in info["tensors"].items()
        }
        self._server_keys = tuple(k for k in info["optimizer"] if k != "name")
        group.update(_torch_group_defaults(self.optimizer_name))
        group.update(local)
        self._synced: dict[str, Any] = {}
        self._adopt(info["optimizer"], info["lr"], info["clip_grad_norm"])
        self.defaults = {k: v for k, v in group.items() if k not in ("params", "param_names")}
        #: the server's answer to the last push (version, applied, skipped, total_norm, ...)
        self.last_push = None

    # -- setup -------------------------------------------------------------------------------

    def _join(
        self,
        optimizer: str | None,
        hyperparameters: Mapping[str, Any],
        clip_grad_norm: float | None,
        name: str | None,
    ) -> dict[str, Any]:
        """Check the session fits these parameters, apply explicit settings, pull the params."""
        info = self.session.info()
        if optimizer is not None and optimizer != info["optimizer"]["name"]:
            raise ValueError(
                f"session {self.session.id} runs {info['optimizer']['name']!r}, not {optimizer!r}"
            )
        params = self.param_groups[0]["params"]
        for pname, param in zip(self._names, params, strict=True):
            spec = info["tensors"].get(pname)
            if spec is None:
                raise ValueError(f"session {self.session.id} has no tensor {pname!r}")
            if tuple(spec["shape"]) != tuple(param.shape):
                raise ValueError(
                    f"tensor {pname!r} has shape {spec['shape']} in session {self.session.id}, "
                    f"the parameter {list(param.shape)}"
                )
        changes: dict[str, Any] = {k: _plain(v) for k, v in hyperparameters.items()}
        if clip_grad_norm is not None:
            changes["clip_grad_norm"] = clip_grad_norm
        if name is not None:
            changes["name"] = name
        if changes:
            info = self.session.update(**changes)
        self._copy_in(self.session.pull(self._names))
        return info

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if self.param_groups:
            raise ValueError("RemoteOptimizer supports one param group: a session is fixed")
        super().add_param_group(param_group)

    # -- bookkeeping -------------------------------------------------------------------------

    @property
    def _params(self) -> list[torch.Tensor]:
        return self.param_groups[0]["params"]

    def _adopt(self, view: Mapping[str, Any], lr: float, clip_grad_norm: float | None) -> None:
        """Take the server's hyperparameters (and current, possibly scheduled, lr) as synced."""
        group = self.param_groups[0]
        for key in self._server_keys:
            if key in view:
                group[key] = _from_server(view[key])
        group["lr"] = lr
        self._synced = {k: group[k] for k in self._server_keys if k in group}
        self.clip_grad_norm = self._synced_clip = clip_grad_norm

    def _pending_changes(self) -> dict[str, Any]:
        group = self.param_groups[0]
        return {
            key: _plain(group[key])
            for key in self._server_keys
            if key in group and _plain(group[key]) != _plain(self._synced.get(key))
        }

    def _sync_hyperparameters(self) -> None:
        """PATCH what changed in `param_groups[0]` (or `clip_grad_norm`) since the last sync."""
        changes = self._pending_changes()
        clip = self.clip_grad_norm if self.clip_grad_norm != self._synced_clip else UNSET
        if not changes and clip is UNSET:
            return
        self.session.update(clip_grad_norm=clip, **changes)
        group = self.param_groups[0]
        self._synced.update({key: group[key] for key in changes})
        self._synced_clip = self.clip_grad_norm

    def _copy_in(self, values: Mapping[str, np.ndarray]) -> None:
        with torch.no_grad():
            for pname, param in zip(self._names, self._params, strict=True):
                value = values.get(pname)
                if value is not None:
                    param.copy_(torch.from_numpy(value).reshape(param.shape))

    # -- torch.optim.Optimizer ---------------------------------------------------------------

    def step(self, closure: Closure | None = None) -> Any:  # type: ignore[override]
        """Push every `.grad` (None ones are skipped), copy the new values in; closure's loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grads: dict[str, np.ndarray] = {}
        for pname, param in zip(self._names, self._params, strict=True):
            grad = param.grad
            if grad is None:
                continue
            if grad.is_sparse:
                raise RuntimeError(f"parameter {pname!r} has a sparse gradient: not supported")
            grads[pname] = _to_numpy(grad)
        if not grads:
            return loss  # torch steps nothing either
        self._sync_hyperparameters()
        self._copy_in(self.session.push(grads))
        self.last_push = self.session.last_push
        return loss

    def state_dict(self) -> dict[str, Any]:
        """torch's state_dict for this optimizer, from the server's state (one GET).

        `{"state": {i: {"step": tensor(float32), "exp_avg": ..., ...}}, "param_groups": [{...,
        "params": [0, 1, ...]}]}` with torch's keys, so that the torch optimizer of the same kind
        loads it and continues identically. Pending hyperparameter changes are sent first;
        `param_groups[0]` is refreshed from the server (e.g. the lr of a server schedule).
        """
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)
        self._sync_hyperparameters()
        document = self.session.state()
        info_lr = document["lr_schedule_state"]["lr"]
        self._adopt(document["optimizer"], info_lr, self._synced_clip)
        state: dict[int, dict[str, Any]] = {}
        for index, (pname, param) in enumerate(zip(self._names, self._params, strict=True)):
            entry = document["tensors"].get(pname, {})
            keys = sorted((k for k in entry if k != "param"), key=_state_rank)
            if keys:
                state[index] = {
                    key: torch.tensor(entry[key], dtype=torch.float32)
                    if isinstance(entry[key], float)
                    else torch.from_numpy(entry[key]).to(param.device)
                    for key in keys
                }
        group = {k: copy.copy(v) for k, v in self.param_groups[0].items() if k != "params"}
        group["params"] = list(range(len(self._names)))
        state_dict: dict[str, Any] = {"state": state, "param_groups": [group]}
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            result = post_hook(self, state_dict)
            if result is not None:
                state_dict = result
        return state_dict

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Load a torch state_dict (e.g. a local `torch.optim.Adam`'s) into the session.

        As in torch, the saved hyperparameters replace the live ones and parameters without an
        entry in `state` have no state afterwards. The parameters' current local values are
        uploaded with the state (torch's load_state_dict leaves parameters alone, so the
        model's values are the ones to continue from).
        """
        state_dict = dict(state_dict)
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        saved_groups = copy.deepcopy(state_dict["param_groups"])
        if len(saved_groups) != 1:
            raise ValueError("loaded state dict has a different number of parameter groups")
        saved = saved_groups[0]
        ids = saved["params"]
        if len(ids) != len(self._names):
            raise ValueError(
                "loaded state dict contains a parameter group that doesn't match the size of "
                "optimizer's group"
            )
        saved_state = state_dict.get("state", {})
        tensors: dict[str, dict[str, Any]] = {}
        for pname, pid, param in zip(self._names, ids, self._params, strict=True):
            entry: dict[str, Any] = {"param": _to_numpy(param)}
            for key, value in saved_state.get(pid, {}).items():
                if value is not None:
                    entry[key] = _state_value(key, value)
            tensors[pname] = entry
        others = set(self._session_tensors) - set(tensors)
        if others:  # joined with a subset: the session's other tensors keep their state
            current = self.session.state()["tensors"]
            tensors.update({n: current[n] for n in others})
        hyperparameters = {k: _plain(saved[k]) for k in self._server_keys if k in saved}
        self.session.load_state({"optimizer": {"name": self.optimizer_name, **hyperparameters},
                                 "tensors": tensors})  # fmt: skip
        if "lr" in hyperparameters:
            # PUT /state stores the hyperparameter but leaves the running (scheduled) lr as it
            # was; torch's group["lr"] is the running lr, which only PATCH sets.
            self.session.update(lr=hyperparameters["lr"])
        old = self.param_groups[0]
        saved["params"] = old["params"]
        if "param_names" in old and "param_names" not in saved:
            saved["param_names"] = old["param_names"]
        for key in self._server_keys:
            saved.setdefault(key, old[key])
        self.param_groups = [saved]
        self._synced = {k: saved[k] for k in self._server_keys}
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    # -- extras ------------------------------------------------------------------------------

    def refresh(self) -> dict[str, Any]:
        """Re-read the session: hyperparameters, the current lr (a server schedule moves it) and
        clip_grad_norm into `param_groups[0]`, dropping unsent local changes; returns the info."""
        info = self.session.info()
        self._adopt(info["optimizer"], info["lr"], info["clip_grad_norm"])
        return info

    def pull_params(self) -> int:
        """Copy the session's current values into the parameters (e.g. after another worker's
        pushes); returns the version they are at."""
        self._copy_in(self.session.pull(self._names))
        return self.session.version

    def put_params(self) -> int:
        """Upload the parameters' local values (after changing them outside `step()`, e.g. with
        `model.load_state_dict`); the optimizer state is untouched. Returns the new version."""
        return self.session.put_params(
            {n: _to_numpy(p) for n, p in zip(self._names, self._params, strict=True)}
        )

    def close(self) -> None:
        """Release the HTTP connections (if this optimizer made its client). The session stays."""
        if getattr(self, "_owns_client", False):
            self.client.close()
