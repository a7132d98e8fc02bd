"""One session driven in turn by Python, JS and Go pushes ends exactly where Python alone does."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from optserve_client import Client

REPO = Path(__file__).resolve().parent.parent
NODE, GO = shutil.which("node"), shutil.which("go")

pytestmark = pytest.mark.skipif(not (NODE and GO), reason="needs node and go on PATH")


@pytest.fixture(scope="module")
def go_push(tmp_path_factory) -> Path:
    """The Go client's push CLI, built once (offline, standard library only)."""
    out = tmp_path_factory.mktemp("go") / "optserve-push"
    cache = tmp_path_factory.mktemp("gocache")
    env = {**os.environ, "GOFLAGS": "-mod=mod", "GOPROXY": "off", "GOCACHE": str(cache)}
    env.setdefault("GOPATH", str(cache / "gopath"))
    subprocess.run(
        [GO, "build", "-o", str(out), "./cmd/optserve-push"],
        cwd=REPO / "clients" / "go",
        env=env,
        check=True,
        capture_output=True,
    )
    return out


def gradient(step: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(step)
    return {
        "layer.weight": rng.standard_normal((3, 4)).astype(np.float32),
        "layer.bias": rng.standard_normal(4).astype(np.float32),
    }


def push_with(language: str, url: str, sid: str, grads, tmp_path: Path, codec: str, go_push):
    if language == "python":
        with Client(url, codec=codec) as client:
            client.session(sid).push(grads, base_version=None)
        return
    spec = {
        name: {"shape": list(g.shape), "data": g.reshape(-1).tolist()} for name, g in grads.items()
    }
    path = tmp_path / f"grads-{language}.json"
    path.write_text(json.dumps(spec))
    command = [NODE, str(REPO / "clients/js/bin/push.mjs")] if language == "js" else [str(go_push)]
    done = subprocess.run(
        [*command, url, sid, str(path), codec], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["applied"] is True


@pytest.mark.parametrize("codec", ["json", "safetensors"])
def test_python_js_and_go_pushes_equal_python_alone(api_url, tmp_path, codec, go_push):
    initial = {
        "layer.weight": np.full((3, 4), 0.5, np.float32),
        "layer.bias": np.zeros(4, np.float32),
    }
    with Client(api_url) as client:
        mixed = client.create_session("adam", initial, lr=0.01)
        alone = client.create_session("adam", initial, lr=0.01)
        languages = ["python", "js", "go"] * 3
        for step, language in enumerate(languages):
            push_with(language, api_url, mixed.id, gradient(step), tmp_path, codec, go_push)
            alone.push(gradient(step), base_version=None)
        a, b = mixed.pull(), alone.pull()
        assert mixed.info()["version"] == alone.info()["version"] == len(languages)
    for name in initial:
        np.testing.assert_array_equal(a[name], b[name])
