"""The JavaScript client (clients/js) against a real `optserve serve`, run with `node --test`.

The JS tests cover every endpoint the client wraps, errors, retries (through a Node proxy in
front of this server) and the safetensors codec. This wrapper gives them the server's URL and a
directory of files written by the Python `safetensors` package (the JS tests decode them bit for
bit, re-encode them, and write files of their own), then loads every file the JS side wrote with
the package and checks the values bit for bit. Skipped when `node` is not installed.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import safetensors
import safetensors.numpy

ROOT = Path(__file__).resolve().parents[1]
JS_DIR = ROOT / "clients" / "js"
NODE = shutil.which("node")

pytestmark = pytest.mark.skipif(NODE is None, reason="node is not installed")

#: Every kind of float32 the codec must carry bit for bit: zeros, NaNs with payloads, infinities,
#: subnormals, extremes and the value whose shortest JSON text double-rounds.
SPECIAL_BITS = [
    0x00000000, 0x80000000, 0x7FC00000, 0xFFC00000, 0x7FC00001, 0x7F800001, 0x7FBFFFFF,
    0x7F800000, 0xFF800000, 0x00000001, 0x807FFFFF, 0x00800000, 0x7F7FFFFF, 0xFF7FFFFF,
    0x3F800000, 0x15AE43FD,
]  # fmt: skip


def b64(array: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(array, dtype="<f4").tobytes()).decode()


def from_b64(text: str, shape: list[int]) -> np.ndarray:
    return np.frombuffer(base64.b64decode(text), dtype="<f4").reshape(shape).astype(np.float32)


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return (
        a.dtype == b.dtype == np.float32
        and a.shape == b.shape
        and np.array_equal(a.view(np.uint32), b.view(np.uint32))
    )


def python_cases() -> dict[str, tuple[dict[str, np.ndarray], dict[str, str] | None]]:
    rng = np.random.default_rng(20240611)
    bits = rng.integers(0, 2**32, size=1000, dtype=np.uint64).astype(np.uint32)
    return {
        "basic": (
            {
                "w": rng.standard_normal((2, 3)).astype(np.float32),
                "b": rng.standard_normal(3).astype(np.float32),
            },
            {"version": "7"},
        ),
        "special": (
            {
                "special": np.array(SPECIAL_BITS, np.uint32).view(np.float32),
                "scalar": np.array(-0.0, np.float32),
                "empty": np.zeros((0, 3), np.float32),
            },
            None,
        ),
        "names": (
            {
                name: np.full(2, i, np.float32)
                for i, name in enumerate(
                    ["enc/w", "é", "\U0001f600", "\uff01", "10", "9", "__proto__", 'q"uote', "a b"]
                )
            },
            {"version": "3", "worker": '"a"', "scalars": '{"w":{"step":3.0}}', "note": "ünï ✓"},
        ),
        "random_bits": ({"x": bits.view(np.float32).reshape(10, 100)}, {"k": "v"}),
        "large": ({"big": rng.standard_normal((256, 1024)).astype(np.float32)}, None),
    }


def write_python_fixtures(directory: Path) -> dict[str, Any]:
    directory.mkdir(parents=True)
    manifest: dict[str, Any] = {}
    for name, (tensors, metadata) in python_cases().items():
        safetensors.numpy.save_file(tensors, str(directory / f"{name}.safetensors"), metadata)
        manifest[name] = {
            "file": f"{name}.safetensors",
            "metadata": metadata,
            "tensors": {n: {"shape": list(a.shape), "b64": b64(a)} for n, a in tensors.items()},
        }
    (directory / "manifest.json").write_text(json.dumps(manifest))
    return manifest


def node_command() -> list[str]:
    """`node --test` on the test files, with the readable reporter where Node has one (18.15+)."""
    version = subprocess.run([NODE, "--version"], capture_output=True, text=True, check=True)
    major, minor = (int(part) for part in re.findall(r"\d+", version.stdout)[:2])
    command = [NODE, "--test"]
    if (major, minor) >= (18, 15):
        command.append("--test-reporter=spec")
    files = sorted(str(p.relative_to(JS_DIR)) for p in (JS_DIR / "test").glob("*.test.js"))
    assert files, "no JS test files found"
    return command + files


def test_js_client(api_url: str, tmp_path: Path) -> None:
    fixtures = tmp_path / "st"
    manifest = write_python_fixtures(fixtures / "py")
    env = {**os.environ, "OPTSERVE_URL": api_url, "OPTSERVE_ST_FIXTURES": str(fixtures)}
    env.pop("NODE_OPTIONS", None)
    result = subprocess.run(
        node_command(),
        cwd=JS_DIR,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    output = result.stdout + result.stderr
    if result.returncode != 0:
        print(output)
    assert result.returncode == 0, f"node --test failed:\n{output[-20000:]}"
    assert re.search(r"\bfail 0\b", output) and re.search(r"\bskipped 0\b", output), output[-5000:]
    print(output[-1500:])

    # Every file the JS side wrote, loaded with the Python package.
    written = json.loads((fixtures / "js" / "manifest.json").read_text())
    expected_cases = {"js_made", "message", "state"} | {f"roundtrip_{name}" for name in manifest}
    assert set(written) == expected_cases
    for case, entry in written.items():
        path = fixtures / "js" / entry["file"]
        with safetensors.safe_open(str(path), framework="numpy") as reader:
            assert (reader.metadata() or {}) == (entry["metadata"] or {}), case
            loaded = {name: reader.get_tensor(name) for name in reader.keys()}  # noqa: SIM118
        assert set(loaded) == set(entry["tensors"]), case
        for name, spec in entry["tensors"].items():
            assert same_bits(loaded[name], from_b64(spec["b64"], spec["shape"])), (case, name)
        # The other reader of the package agrees.
        assert set(safetensors.numpy.load(path.read_bytes())) == set(loaded), case

    # Python's files, decoded and re-encoded in JS, are the originals bit for bit; with at most
    # one metadata entry (the package writes metadata in hash order) they are the same bytes.
    for name, (tensors, metadata) in python_cases().items():
        path = fixtures / "js" / f"roundtrip_{name}.safetensors"
        loaded = safetensors.numpy.load_file(str(path))
        assert set(loaded) == set(tensors), name
        for tensor_name, array in tensors.items():
            assert same_bits(loaded[tensor_name], array), (name, tensor_name)
        if len(metadata or {}) <= 1:
            assert path.read_bytes() == (fixtures / "py" / f"{name}.safetensors").read_bytes(), name

    # What the client's messages hold: fields as JSON texts, state arrays as <tensor>/<state>.
    with safetensors.safe_open(str(fixtures / "js" / "message.safetensors"), "numpy") as reader:
        assert reader.metadata() == {"base_version": "3", "worker": '"w1"'}
        np.testing.assert_array_equal(
            reader.get_tensor("w"), np.arange(1, 7, dtype=np.float32).reshape(2, 3)
        )
    state = safetensors.numpy.load_file(str(fixtures / "js" / "state.safetensors"))
    assert sorted(state) == ["enc/w/exp_avg", "enc/w/param"]
