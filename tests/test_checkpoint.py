"""`optserve checkpoint save/load` as real subprocesses against a real server: a restored session
continues bit-identically (params, every state array, steps, version), and the file is a plain
safetensors file whose metadata the `safetensors` package reads."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
from safetensors import safe_open

from .api_helpers import ST, assert_problem, create, push, st_body, st_parse, state


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "optserve", "checkpoint", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture
def client(api_url):
    with httpx.Client(base_url=api_url, timeout=60) as client:
        yield client


SETUPS = {
    "adam": dict(optimizer={"name": "adam", "lr": 0.01, "amsgrad": True, "weight_decay": 0.1}),
    "nadam-scheduled-clipped": dict(
        optimizer={"name": "nadam", "lr": 0.02},
        lr_schedule={"type": "step", "step_size": 2, "gamma": 0.5},
        clip_grad_norm=0.5,
        max_staleness=100,
        ttl_s=3600,
    ),
}


@pytest.mark.parametrize("setup", list(SETUPS))
def test_round_trip_continues_bit_identically(client, api_url, tmp_path, setup):
    rng = np.random.default_rng(7)
    params = {
        "w": rng.standard_normal((3, 4)).astype(np.float32),
        "enc/b": rng.standard_normal(4).astype(np.float32),  # "/" in a tensor name
        "frozen": np.ones(2, np.float32),  # never pushed: no state at all
    }
    source = create(client, params=params, name="run-1", **SETUPS[setup])["id"]

    def grads(step: int) -> dict[str, np.ndarray]:
        g = {"w": rng.standard_normal((3, 4)).astype(np.float32)}
        if step % 2 == 0:  # every other push skips "enc/b": per-tensor steps differ
            g["enc/b"] = rng.standard_normal(4).astype(np.float32)
        return g

    for step in range(5):
        push(client, source, grads(step))
    file = tmp_path / "run.safetensors"
    saved = cli("save", source, str(file), "--url", api_url)
    assert saved.returncode == 0, saved.stderr
    loaded = cli("load", str(file), "--url", api_url)
    assert loaded.returncode == 0, loaded.stderr
    restored = loaded.stdout.strip()
    assert restored != source

    assert state(client, restored) == state(client, source)  # every byte, steps, version
    a, b = (
        client.get(f"/v1/sessions/{source}").json(),
        client.get(f"/v1/sessions/{restored}").json(),
    )
    for key in ("version", "optimizer", "lr", "lr_schedule", "clip_grad_norm", "max_staleness",
                "mode", "nonfinite", "staleness", "name", "ttl_s", "tensors"):  # fmt: skip
        assert a[key] == b[key], key

    for step in range(5, 9):
        g = grads(step)
        pushes = [
            client.post(
                f"/v1/sessions/{sid}/gradients",
                content=st_body(g),
                headers={"content-type": ST, "accept": ST},
            )
            for sid in (source, restored)
        ]
        assert pushes[0].status_code == pushes[1].status_code == 200
        (pa, fa), (pb, fb) = (st_parse(p.content) for p in pushes)
        assert fa == fb and fa["version"] == step + 1  # version, lr, norms: the same
        assert {k: v.tobytes() for k, v in pa.items()} == {k: v.tobytes() for k, v in pb.items()}
    assert state(client, restored) == state(client, source)


def test_checkpoint_file_is_plain_safetensors(client, api_url, tmp_path):
    sid = create(
        client, {"name": "adam", "lr": 0.01}, {"w": np.arange(6, dtype=np.float32)}, name="x"
    )["id"]
    push(client, sid, {"w": np.ones(6, np.float32)})
    file = tmp_path / "x.safetensors"
    assert cli("save", sid, str(file), "--url", api_url).returncode == 0
    with safe_open(str(file), framework="np") as handle:
        metadata = handle.metadata()
        names = set(handle.keys())
        exp_avg = handle.get_tensor("state/w/exp_avg")
    assert names == {"param/w", "state/w/exp_avg", "state/w/exp_avg_sq"}
    assert exp_avg.dtype == np.float32 and exp_avg.shape == (6,)
    assert metadata["format"] == "optserve-checkpoint" and metadata["format_version"] == "1"
    assert metadata["source_session"] == sid and metadata["version"] == "1"
    assert json.loads(metadata["optimizer"])["name"] == "adam"
    assert json.loads(metadata["scalars"]) == {"w": {"step": 1.0}}
    assert json.loads(metadata["mode"]) == {"type": "async"}
    assert json.loads(metadata["clip_grad_norm"]) is None
    assert metadata["created_at"].endswith("Z")

    loaded = cli("load", str(file), "--url", api_url, "--name", "copy", "--ttl-s", "120")
    assert loaded.returncode == 0, loaded.stderr
    view = client.get(f"/v1/sessions/{loaded.stdout.strip()}").json()
    assert (view["name"], view["ttl_s"], view["version"]) == ("copy", 120, 1)


def test_failures_exit_nonzero_and_leave_nothing_behind(client, api_url, tmp_path):
    missing = "0" * 32
    saved = cli("save", missing, str(tmp_path / "none.safetensors"), "--url", api_url)
    assert saved.returncode == 1 and "404 session_not_found" in saved.stderr
    assert not (tmp_path / "none.safetensors").exists()
    not_ours = tmp_path / "plain.safetensors"
    not_ours.write_bytes(st_body({"w": np.ones(2)}))
    assert "not an optserve checkpoint" in cli("load", str(not_ours), "--url", api_url).stderr

    # A checkpoint the server refuses (a state that does not fit): the new session is removed.
    sid = create(client, {"name": "adam"}, {"w": np.ones(2, np.float32)}, name="bad-ckpt")["id"]
    push(client, sid, {"w": np.ones(2, np.float32)})
    file = tmp_path / "bad.safetensors"
    assert cli("save", sid, str(file), "--url", api_url).returncode == 0
    with safe_open(str(file), framework="np") as handle:
        metadata = handle.metadata()
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118 - not a dict
    del tensors["state/w/exp_avg"]
    from safetensors.numpy import save_file

    save_file(tensors, str(file), metadata=metadata)
    before = len(client.get("/v1/sessions", params={"limit": 1000}).json()["sessions"])
    refused = cli("load", str(file), "--url", api_url)
    assert refused.returncode == 1 and "422 invalid_state" in refused.stderr
    after = len(client.get("/v1/sessions", params={"limit": 1000}).json()["sessions"])
    assert after == before


def test_adopt_version_never_goes_back(client):
    sid = create(client, {"name": "sgd", "lr": 0.1}, {"w": np.ones(2, np.float32)})["id"]
    push(client, sid, {"w": np.ones(2, np.float32)})
    push(client, sid, {"w": np.ones(2, np.float32)})
    doc = client.get(f"/v1/sessions/{sid}/state").json()
    before = state(client, sid)
    doc["version"] = 2  # not past the session's version 2
    response = client.put(f"/v1/sessions/{sid}/state?adopt_version=true", json=doc)
    assert_problem(response, 422, "invalid_state")
    assert state(client, sid) == before
    doc["version"] = 10
    response = client.put(f"/v1/sessions/{sid}/state?adopt_version=true", json=doc)
    assert response.status_code == 200 and response.json()["version"] == 10
    assert client.put(f"/v1/sessions/{sid}/state", json=doc).json()["version"] == 11


def test_load_reads_the_file_it_wrote(tmp_path: Path):
    """from_file inverts to_file exactly (no server): names with '/' and scalars survive."""
    from optserve.checkpoint import from_file, to_file

    view = {"id": "s", "name": None, "mode": {"type": "async"}, "clip_grad_norm": None,
            "nonfinite": "reject", "max_staleness": None, "staleness": "reject",
            "ttl_s": None}  # fmt: skip
    exported = {
        "version": 3,
        "optimizer": {"name": "nadam", "lr": 0.1},
        "lr_schedule": None,
        "lr_schedule_state": {"lr": 0.1},
        "tensors": {
            "a/b": {
                "param": np.ones(2, np.float32),
                "exp_avg": np.zeros(2, np.float32),
                "step": 3.0,
                "mu_product": 0.912345,
            },
            "c": {"param": np.full(1, 2.0, np.float32)},
        },
    }
    to_file(view, exported, tmp_path / "f.safetensors")
    settings, state_ = from_file(tmp_path / "f.safetensors")
    assert settings == {k: v for k, v in view.items() if k != "id"}
    assert state_["version"] == 3 and state_["optimizer"] == exported["optimizer"]
    assert set(state_["tensors"]) == {"a/b", "c"}
    assert state_["tensors"]["a/b"]["mu_product"] == 0.912345
    np.testing.assert_array_equal(state_["tensors"]["c"]["param"], [2.0])
