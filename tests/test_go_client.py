"""The Go client (clients/go) against a real `optserve serve` on a real Valkey, driven from pytest.

`go test ./...` runs the Go suite with OPTSERVE_URL pointing at the session's server, offline
(GOPROXY=off, standard library only) with its build cache under clients/go/.cache (ignored by
git). The safetensors codec is checked against the Python `safetensors` package both ways through
files in OPTSERVE_ST_FIXTURES: the package writes files the Go test decodes bit for bit (and must
re-encode to the very same bytes); the Go test writes files the package loads here, which must be
byte-identical to what the package itself writes for the same tensors. JSON floats cross the same
way: the server's float32 texts read by Go, Go's read by Python's json (a double-first reader) and
by the server's decoder. Finally the Go CLI `optserve-push` pushes into a session made by the
Python client. Skipped when `go` is not installed (`make test` installs it).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import redis
from safetensors import safe_open
from safetensors.numpy import load_file, save, save_file

from optserve.wire.json_codec import decode_json_tensor, encode_json, encode_json_tensor
from optserve_client import Client

from .conftest import KEY_A, ServerProcess

GO_DIR = Path(__file__).resolve().parent.parent / "clients" / "go"
GO = shutil.which("go")

pytestmark = pytest.mark.skipif(GO is None, reason="go is not installed (make test installs it)")


def go_env(**extra: str) -> dict[str, str]:
    """Offline, standard library only, caches in clients/go/.cache (git-ignored)."""
    cache = GO_DIR / ".cache"
    env = {
        **os.environ,
        "GOFLAGS": "-mod=mod",
        "GOPROXY": "off",
        "GOSUMDB": "off",
        "GOTOOLCHAIN": "local",
        "GOWORK": "off",
        "GO111MODULE": "on",
        "CGO_ENABLED": "0",
        "GOCACHE": str(cache / "go-build"),
        "GOPATH": str(cache / "gopath"),
    }
    env.update(extra)
    return env


def run_go(*args: str, timeout: float = 900, **env: str) -> subprocess.CompletedProcess[str]:
    assert GO is not None
    return subprocess.run(
        [GO, *args],
        cwd=GO_DIR,
        env=go_env(**env),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def bits(array: np.ndarray) -> list[int]:
    return np.ascontiguousarray(array, dtype=np.float32).view(np.uint32).reshape(-1).tolist()


def from_bits(values: list[int], shape: list[int]) -> np.ndarray:
    return np.array(values, dtype=np.uint32).view(np.float32).reshape(shape)


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    return (
        a.dtype == b.dtype == np.float32
        and a.shape == b.shape
        and np.array_equal(a.view(np.uint32), b.view(np.uint32))
    )


def same_file(ours: bytes, package: bytes) -> None:
    """Byte for byte, but for the order of metadata keys: the package writes them in a Rust
    HashMap's order (random per process), the Go encoder sorts them. So: the same header length
    (the same padding), the same data section, headers equal as JSON, and every byte equal when
    the metadata has at most one key."""
    n = 8 + int.from_bytes(package[:8], "little")
    assert ours[:8] == package[:8] and len(ours) == len(package)
    assert ours[n:] == package[n:]
    header = json.loads(package[8:n])
    assert json.loads(ours[8:n]) == header
    if len(header.get("__metadata__") or {}) <= 1:
        assert ours == package


# -- fixtures the Python package writes for the Go test -------------------------------------------

SPECIAL_BITS = [
    0x00000000, 0x80000000, 0x7FC00000, 0x7FC00001, 0xFFFFFFFF, 0x7F800000, 0xFF800000,
    0x00000001, 0x807FFFFF, 0x7F7FFFFF, 0xFF7FFFFF, 0x15AE43FD, 0x3F800000, 0x3DCCCCCD,
    0xC0600000, 0x3EAAAAAB,
]  # fmt: skip


def python_cases() -> dict[str, tuple[dict[str, np.ndarray], dict[str, str] | None]]:
    rng = np.random.default_rng(20240611)

    def random_bits(*shape: int) -> np.ndarray:
        n = int(np.prod(shape))
        values = rng.integers(0, 2**32, size=n, dtype=np.uint64).astype(np.uint32)
        return values.view(np.float32).reshape(shape)

    return {
        "py_special": (
            {"special": from_bits(SPECIAL_BITS, [4, 4]), "random": random_bits(3, 5, 7)},
            {"version": "12", "applied": "true", "params_version": "12"},
        ),
        "py_shapes": (
            {
                "scalar": np.array(-2.5, np.float32),
                "empty": np.zeros((0,), np.float32),
                "empty3": np.zeros((2, 0, 3), np.float32),
                "big": random_bits(1000, 3),
            },
            None,
        ),
        "py_names": (
            {
                "a/b": np.ones(2, np.float32),
                "ä ß": np.full(3, 2, np.float32),
                'quote"back\\slash': np.array([3], np.float32),
                "tab\tnl\n": np.array([4], np.float32),
                "B": np.array([5], np.float32),
                "€uro": random_bits(2, 2),
                "<html>&": np.array([8], np.float32),
            },
            {
                "worker": '"w-1"',
                "ctl": "\b\f\x01\x1f\x7f",
                "html": "<a&b>",
                "seps": "\u2028\u2029",
                "ünï": "cödé",
                "scalars": '{"w": {"step": 3.0}}',
            },
        ),
        "py_emptymeta": ({"x": np.arange(5, dtype=np.float32)}, {}),
        "py_onlymeta": ({}, {"a": "1"}),
    }


def expectation(tensors: dict[str, np.ndarray], metadata: dict[str, str] | None) -> dict:
    return {
        "tensors": {n: {"shape": list(a.shape), "bits": bits(a)} for n, a in tensors.items()},
        "metadata": metadata,
    }


def write_python_fixtures(directory: Path) -> None:
    directory.mkdir(parents=True)
    for name, (tensors, metadata) in python_cases().items():
        save_file(tensors, str(directory / f"{name}.safetensors"), metadata=metadata)
        (directory / f"{name}.json").write_text(json.dumps(expectation(tensors, metadata)))
    # The server's own JSON float32 texts (orjson's shortest form, float64 text for the trap).
    rng = np.random.default_rng(5)
    specials = from_bits(SPECIAL_BITS, [16])
    floats = {
        "special": np.where(np.isfinite(specials), specials, np.float32(1.5)).astype(np.float32),
        "random": rng.standard_normal(1000).astype(np.float32)
        * np.float32(10.0) ** rng.integers(-40, 38, 1000).astype(np.float32),
        "trap": from_bits([0x15AE43FD, 0x95AE43FD, 0x15AE43FE], [3]),
        "subnormal": from_bits(list(range(1, 200, 7)), [29]),
    }
    floats = {n: np.where(np.isfinite(a), a, np.float32(2)) for n, a in floats.items()}
    (directory / "floats_server.json").write_bytes(
        encode_json({n: encode_json_tensor(n, a) for n, a in floats.items()})
    )
    (directory / "floats_server.bits.json").write_text(
        json.dumps({n: {"shape": list(a.shape), "bits": bits(a)} for n, a in floats.items()})
    )


# -- one `go test ./...` run for the module -------------------------------------------------------


@dataclass
class GoRun:
    result: subprocess.CompletedProcess[str]
    fixtures: Path

    def explain(self) -> str:
        out, err = self.result.stdout[-20000:], self.result.stderr[-5000:]
        return f"exit {self.result.returncode}\n{out}\n{err}"


@pytest.fixture(scope="module")
def go_run(
    api_server: ServerProcess,
    auth_server: ServerProcess,
    tmp_path_factory: pytest.TempPathFactory,
) -> GoRun:
    fixtures = tmp_path_factory.mktemp("safetensors-fixtures")
    write_python_fixtures(fixtures / "py")
    with redis.Redis.from_url(auth_server.env["OPTSERVE_REDIS_URL"]) as store:
        store.flushdb()  # no sessions left by earlier tests count against the tenant's bound
    result = run_go(
        "test", "-count=1", "-v", "./...",
        OPTSERVE_URL=api_server.url,
        OPTSERVE_ST_FIXTURES=str(fixtures),
        OPTSERVE_AUTH_URL=auth_server.url,
        OPTSERVE_AUTH_KEY=KEY_A,
    )  # fmt: skip
    return GoRun(result, fixtures)


def test_go_suite_passes_against_the_live_server(go_run: GoRun) -> None:
    assert go_run.result.returncode == 0, go_run.explain()
    output = go_run.result.stdout
    skipped = [line for line in output.splitlines() if "--- SKIP" in line]
    assert not skipped, go_run.explain()  # the live tests and the fixture tests really ran
    for name in (
        "TestSessionLifecycle", "TestLostPushAnswerIsRetriedWithTheSameKeyAndAppliedOnce",
        "TestLongPoll", "TestSafetensorsPythonFixtures", "TestSafetensorsWriteGoFixtures",
    ):  # fmt: skip
        assert f"--- PASS: {name}" in output, go_run.explain()


def test_go_safetensors_files_load_in_the_python_package(go_run: GoRun) -> None:
    assert go_run.result.returncode == 0, go_run.explain()
    directory = go_run.fixtures / "go"
    files = sorted(directory.glob("*.safetensors"))
    assert {f.stem for f in files} >= {"special", "shapes", "names", "nometa", "emptymeta"}
    for path in files:
        expected = json.loads(path.with_suffix(".json").read_text())
        loaded = load_file(str(path))
        with safe_open(str(path), "np") as handle:
            metadata = handle.metadata()
        assert metadata == expected["metadata"], path.name
        assert set(loaded) == set(expected["tensors"]), path.name
        for name, spec in expected["tensors"].items():
            want = from_bits(spec["bits"], spec["shape"])
            assert same_bits(loaded[name], want), (path.name, name)
        # What the package writes for the same tensors and metadata.
        same_file(path.read_bytes(), save(loaded, metadata=expected["metadata"]))


def test_go_json_floats_read_back_exactly(go_run: GoRun) -> None:
    assert go_run.result.returncode == 0, go_run.explain()
    directory = go_run.fixtures / "go"
    text = (directory / "floats.json").read_bytes()
    expected = json.loads((directory / "floats.bits.json").read_text())
    parsed = json.loads(text)  # Python's json: a double first, then float32
    assert set(parsed) == set(expected)
    for name, spec in expected.items():
        want = from_bits(spec["bits"], spec["shape"])
        via_double = np.array(parsed[name]["data"], dtype=np.float64).astype(np.float32)
        assert same_bits(via_double.reshape(spec["shape"]), want), name
        assert same_bits(decode_json_tensor(name, parsed[name]), want), name  # the server's reader


# -- the Go CLI pushes into a session the Python client made --------------------------------------


@pytest.fixture(scope="module")
def push_cli(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    binary = tmp_path_factory.mktemp("go-bin") / "optserve-push"
    built = run_go("build", "-o", str(binary), "./cmd/optserve-push")
    assert built.returncode == 0, built.stdout + built.stderr
    yield binary


P0 = np.array([[1.0, 2.0], [-3.0, 0.5]], np.float32)
G = np.array([[0.5, -1.0], [2.0, 0.25]], np.float32)


@pytest.mark.parametrize("codec", ["json", "safetensors"])
def test_go_cli_push_is_seen_by_the_python_client(
    api_url: str, push_cli: Path, tmp_path: Path, codec: str
) -> None:
    with Client(api_url) as client:
        session = client.create_session("sgd", {"w": P0, "b": np.ones(3, np.float32)}, lr=0.5)
        grads = tmp_path / "grads.json"
        grads.write_text(json.dumps({"w": {"shape": [2, 2], "data": G.reshape(-1).tolist()}}))
        done = subprocess.run(
            [str(push_cli), api_url, session.id, str(grads), codec],
            capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr
        answer = json.loads(done.stdout)
        assert answer["version"] == 1 and answer["applied"] is True and answer["attempts"] == 1
        expected = (P0 - np.float32(0.5) * G).astype(np.float32)
        w = answer["params"]["w"]
        assert same_bits(np.array(w["data"], np.float32).reshape(w["shape"]), expected)
        assert same_bits(decode_json_tensor("b", answer["params"]["b"]), np.ones(3, np.float32))
        pulled = session.pull()
        assert session.version == 1
        assert same_bits(pulled["w"], expected)
        session.delete()


def test_go_cli_reports_problems(api_url: str, push_cli: Path, tmp_path: Path) -> None:
    grads = tmp_path / "grads.json"
    grads.write_text(json.dumps({"w": {"shape": [1], "data": [1.0]}}))
    done = subprocess.run(
        [str(push_cli), api_url, "no-such-session", str(grads)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 1 and done.stdout == ""
    assert "404 session_not_found" in done.stderr
    usage = subprocess.run([str(push_cli)], capture_output=True, text=True, check=False)
    assert usage.returncode == 2 and "usage:" in usage.stderr


def test_go_code_is_formatted_and_vetted() -> None:
    vet = run_go("vet", "./...")
    assert vet.returncode == 0, vet.stdout + vet.stderr
    gofmt = Path(GO).resolve().parent / "gofmt" if GO else None
    if gofmt is None or not gofmt.exists():
        found = shutil.which("gofmt")
        if found is None:
            pytest.skip("gofmt not found")
        gofmt = Path(found)
    sources = [str(p.relative_to(GO_DIR)) for p in GO_DIR.rglob("*.go") if ".cache" not in p.parts]
    assert sources
    listed = subprocess.run(
        [str(gofmt), "-l", *sources], cwd=GO_DIR, capture_output=True, text=True, check=False
    )
    assert listed.returncode == 0 and listed.stdout == "", listed.stdout + listed.stderr


def test_go_suite_ran_the_api_key_tests_against_a_server_that_needs_keys(go_run: GoRun) -> None:
    for name in ("TestAPIKeyOnAServerThatNeedsOne", "Test429IsRetriedEvenForCreate"):
        assert f"--- PASS: {name}" in go_run.result.stdout, go_run.explain()
