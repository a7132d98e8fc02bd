"""The Python client against a real `optserve serve` over real HTTP, in both codecs.

Server behaviour is never mocked: the oracle for pushes is the server's own JSON API driven with
plain httpx. The one MockTransport test checks a header the client sends, nothing else. The
client's safetensors codec is checked against the `safetensors` package both ways.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest
import safetensors
import safetensors.numpy
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from optserve_client import Client, OptservError, PushResult, Session
from optserve_client import _safetensors as st_codec
from optserve_client._wire import WireError, decode_json_tensor, encode_json_tensor

from .conftest import free_port

CODECS = ["safetensors", "json"]


@pytest.fixture(params=CODECS)
def client(request: pytest.FixtureRequest, api_url: str) -> Iterator[Client]:
    with Client(api_url, codec=request.param) as c:
        yield c


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(20240611)


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    """Bitwise equality: -0.0 vs 0.0 and NaN payloads count."""
    a, b = np.asarray(a), np.asarray(b)
    return (
        a.dtype == np.float32
        and b.dtype == np.float32
        and a.shape == b.shape
        and np.array_equal(a.view(np.uint32), b.view(np.uint32))
    )


def assert_same_tensors(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert set(a) == set(b)
    for name in a:
        assert same_bits(a[name], b[name]), name


def random_float32_bits(rng: np.random.Generator, n: int) -> np.ndarray:
    """Finite float32s drawn from all bit patterns (subnormals, -0.0, huge and tiny values)."""
    values = rng.integers(0, 2**32, size=n, dtype=np.uint64).astype(np.uint32).view(np.float32)
    return np.where(np.isfinite(values), values, np.float32(1.5)).astype(np.float32)


# -- the server's own JSON API, used as the oracle ------------------------------------------------


def json_tensor(array: np.ndarray) -> dict[str, Any]:
    return {"shape": list(array.shape), "data": array.astype(np.float64).reshape(-1).tolist()}


def from_json_tensor(spec: dict[str, Any]) -> np.ndarray:
    return np.array(spec["data"], dtype=np.float32).reshape(spec["shape"])


def raw_create(api_url: str, body: dict[str, Any]) -> str:
    response = httpx.post(f"{api_url}/v1/sessions", json=body)
    assert response.status_code == 201, response.text
    return response.json()["id"]


def raw_push(api_url: str, sid: str, grads: dict[str, np.ndarray]) -> dict[str, Any]:
    body = {"grads": {name: json_tensor(g) for name, g in grads.items()}}
    response = httpx.post(f"{api_url}/v1/sessions/{sid}/gradients", json=body)
    assert response.status_code == 200, response.text
    answer = response.json()
    answer["params"] = {n: from_json_tensor(s) for n, s in answer["params"].items()}
    return answer


def raw_pull(api_url: str, sid: str) -> dict[str, np.ndarray]:
    response = httpx.get(f"{api_url}/v1/sessions/{sid}/params")
    assert response.status_code == 200, response.text
    return {n: from_json_tensor(s) for n, s in response.json()["params"].items()}


# -- sessions -------------------------------------------------------------------------------------


def test_create_info_list_update_delete(client: Client) -> None:
    w = np.arange(6, dtype=np.float32).reshape(2, 3)
    session = client.create_session(
        "adam", {"w": w}, tensors={"b": (3,), "emb": [4, 2]}, name="demo", lr=0.01, eps=1e-6
    )
    assert isinstance(session, Session) and session.version == 0
    info = session.info()
    assert info["id"] == session.id and info["name"] == "demo"
    assert info["optimizer"]["name"] == "adam"
    assert info["optimizer"]["lr"] == 0.01 and info["optimizer"]["eps"] == 1e-6
    assert info["optimizer"]["betas"] == [0.9, 0.999]  # defaults filled in by the server
    assert info["tensors"] == {
        "w": {"shape": [2, 3], "dtype": "float32"},
        "b": {"shape": [3], "dtype": "float32"},
        "emb": {"shape": [4, 2], "dtype": "float32"},
    }
    assert info["nonfinite"] == "reject" and info["clip_grad_norm"] is None
    params = session.pull()
    assert same_bits(params["w"], w)
    assert same_bits(params["emb"], np.zeros((4, 2), np.float32))

    # The whole optimizer object works as well as name + keywords; keywords win on overlap.
    other = client.create_session(
        {"name": "sgd", "lr": 0.1, "momentum": 0.9},
        {"w": w},
        lr=0.2,
        lr_schedule={"type": "step", "step_size": 2, "gamma": 0.5},
        clip_grad_norm=1.0,
        nonfinite="skip",
    )
    other_info = other.info()
    assert other_info["optimizer"]["lr"] == 0.2 and other_info["optimizer"]["momentum"] == 0.9
    assert other_info["lr_schedule"]["type"] == "step"
    assert other_info["clip_grad_norm"] == 1.0 and other_info["nonfinite"] == "skip"

    ids = {s["id"] for s in client.list_sessions()}
    assert {session.id, other.id} <= ids
    assert len(client.list_sessions(limit=1)) == 1

    joined = client.session(session.id)
    assert joined.id == session.id and joined.version == session.version

    updated = session.update(lr=0.5, clip_grad_norm=2.0, name="renamed", nonfinite="skip")
    assert updated["optimizer"]["lr"] == 0.5 and updated["lr"] == 0.5
    assert updated["clip_grad_norm"] == 2.0 and updated["name"] == "renamed"
    assert updated["nonfinite"] == "skip"
    cleared = session.update(clip_grad_norm=None)  # None turns clipping off; the rest stays
    assert cleared["clip_grad_norm"] is None and cleared["name"] == "renamed"
    assert cleared["optimizer"]["lr"] == 0.5

    session.delete()
    other.delete()
    for call in (session.info, session.pull, session.delete, lambda: client.session(other.id)):
        with pytest.raises(OptservError) as caught:
            call()
        assert caught.value.status == 404 and caught.value.code == "session_not_found"


def test_create_a_sync_session(client: Client) -> None:
    """`mode=` makes a sync session: two pushes form one round whose mean is one step."""
    mode = {"type": "sync", "workers": 2, "timeout_s": 20}
    session = client.create_session("sgd", {"w": np.zeros(2, np.float32)}, mode=mode, lr=1.0)
    assert session.info()["mode"]["type"] == "sync"
    grads = [np.ones(2, np.float32), np.full(2, 3.0, np.float32)]
    handles = [session, client.session(session.id)]
    answers: list[dict[str, np.ndarray]] = [{}, {}]

    def push(i: int) -> None:
        answers[i] = handles[i].push({"w": grads[i]}, worker=f"w{i}")

    threads = [threading.Thread(target=push, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert [h.version for h in handles] == [1, 1]  # one round, one step
    for answer in answers:
        np.testing.assert_array_equal(answer["w"], [-2.0, -2.0])  # minus the mean of 1 and 3
    session.delete()


def test_pushes_match_the_servers_json_answers(client: Client, api_url: str, rng) -> None:
    """The same pushes through the client and through raw JSON give bit-identical params."""
    params = {
        "w": rng.standard_normal((3, 4)).astype(np.float32),
        "b": rng.standard_normal(4).astype(np.float32),
    }
    optimizer = {"name": "adamw", "lr": 0.01, "weight_decay": 0.1, "amsgrad": True}
    session = client.create_session(optimizer, params, clip_grad_norm=0.5)
    oracle = raw_create(
        api_url,
        {
            "optimizer": optimizer,
            "params": {n: json_tensor(p) for n, p in params.items()},
            "clip_grad_norm": 0.5,
        },
    )
    for step in range(1, 5):
        grads = {n: rng.standard_normal(p.shape).astype(np.float32) for n, p in params.items()}
        if step == 3:
            del grads["b"]  # a tensor left out is skipped, on both sides alike
        got = session.push(grads, base_version=session.version, worker=f"worker-{step}")
        expected = raw_push(api_url, oracle, grads)
        assert_same_tensors(got, expected["params"])
        assert session.version == expected["version"] == step
        result = session.last_push
        assert isinstance(result, PushResult)
        assert result.version == step and result.applied is True and result.skipped is None
        assert result.total_norm == expected["total_norm"]
        assert result.params is got

    grads = {"w": rng.standard_normal((3, 4)).astype(np.float32)}
    pushed = session.push(grads, returning="pushed")
    assert set(pushed) == {"w"}
    assert_same_tensors(pushed, {"w": raw_push(api_url, oracle, grads)["params"]["w"]})
    assert session.push(grads, returning="none") == {}
    raw_push(api_url, oracle, grads)
    assert session.version == 6 == session.last_push.version
    assert_same_tensors(session.pull(), raw_pull(api_url, oracle))
    with pytest.raises(ValueError):
        session.push(grads, returning="some")  # type: ignore[arg-type]


def test_pull_names_and_long_poll(client: Client) -> None:
    w = np.ones((2, 2), np.float32)
    session = client.create_session("sgd", {"w": w, "b": np.zeros(2, np.float32)}, lr=0.5)
    assert set(session.pull("w")) == {"w"}
    assert set(session.pull(["b", "w"])) == {"b", "w"}
    assert session.pull([]) == {}

    # Nothing new: the server answers when wait_s is up, with the same version.
    started = time.monotonic()
    assert same_bits(session.pull(after_version=0, wait_s=0.2)["w"], w)
    assert time.monotonic() - started >= 0.15 and session.version == 0

    # Another worker pushes while this one waits: the long poll returns the new params.
    other = client.session(session.id)
    pusher = threading.Timer(0.2, other.push, args=({"w": np.ones((2, 2), np.float32)},))
    pusher.start()
    try:
        started = time.monotonic()
        params = session.pull(wait_s=10)  # after_version defaults to the last version seen
        elapsed = time.monotonic() - started
    finally:
        pusher.join()
    assert elapsed < 5
    assert session.version == 1
    assert same_bits(params["w"], np.full((2, 2), 0.5, np.float32))


def test_put_params_with_if_match(client: Client, rng) -> None:
    session = client.create_session("adam", tensors={"w": (2, 3), "b": 3}, lr=0.1)
    w = rng.standard_normal((2, 3)).astype(np.float32)
    assert session.put_params({"w": w}) == 1 == session.version
    assert same_bits(session.pull("w")["w"], w)
    assert session.put_params({"b": np.ones(3)}, if_match=1) == 2  # float64 input is cast
    assert same_bits(session.pull("b")["b"], np.ones(3, np.float32))
    with pytest.raises(OptservError) as caught:
        session.put_params({"w": np.zeros((2, 3))}, if_match=1)
    error = caught.value
    assert (error.status, error.code) == (412, "precondition_failed")
    assert error.problem["version"] == 2
    assert same_bits(session.pull("w")["w"], w)  # an error changes nothing


@pytest.mark.parametrize("save_codec", CODECS)
@pytest.mark.parametrize("load_codec", CODECS)
def test_state_round_trip(api_url: str, save_codec: str, load_codec: str, rng) -> None:
    """state() from one session, load_state() into another: identical from then on."""
    schedule = {"type": "step", "step_size": 2, "gamma": 0.5}
    optimizer = {"name": "adam", "lr": 0.01, "amsgrad": True}
    # "enc/w": safetensors names state arrays "<tensor>/<state>", so a "/" in a name must survive.
    shapes = {"w": (3, 2), "enc/w": (2,), "frozen": (4,)}
    params = {n: rng.standard_normal(s).astype(np.float32) for n, s in shapes.items()}
    with Client(api_url, codec=save_codec) as saver, Client(api_url, codec=load_codec) as loader:
        source = saver.create_session(optimizer, params, lr_schedule=schedule)
        for _ in range(3):  # "frozen" is never pushed, so it has no optimizer state
            source.push(
                {n: rng.standard_normal(shapes[n]).astype(np.float32) for n in ("w", "enc/w")}
            )
        document = source.state()
        assert document["version"] == 3 == source.version
        assert document["optimizer"]["amsgrad"] is True
        assert document["lr_schedule_state"]["last_epoch"] == 3
        assert set(document["tensors"]) == set(shapes)
        w_state = document["tensors"]["w"]
        assert set(w_state) == {"param", "step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"}
        assert type(w_state["step"]) is float and w_state["step"] == 3.0
        assert isinstance(w_state["exp_avg"], np.ndarray) and w_state["exp_avg"].dtype == np.float32
        assert set(document["tensors"]["frozen"]) == {"param"}

        # A fresh session with other values and another lr takes the whole checkpoint over.
        target = loader.create_session(
            {**optimizer, "lr": 0.5}, tensors=shapes, lr_schedule=schedule
        )
        assert target.load_state(document) == 1 == target.version
        assert_same_tensors(target.pull(), source.pull())
        reloaded = target.state()
        assert reloaded["optimizer"] == document["optimizer"]
        assert reloaded["lr_schedule_state"] == document["lr_schedule_state"]
        for name, entry in document["tensors"].items():
            assert set(reloaded["tensors"][name]) == set(entry)
            for key, value in entry.items():
                if isinstance(value, np.ndarray):
                    assert same_bits(reloaded["tensors"][name][key], value), (name, key)
                else:
                    assert reloaded["tensors"][name][key] == value
        for _ in range(3):  # the schedule decays lr at step 4: it must do so on both
            grads = {n: rng.standard_normal(s).astype(np.float32) for n, s in shapes.items()}
            assert_same_tensors(target.push(grads), source.push(grads))

        with pytest.raises(OptservError) as caught:
            target.load_state(document, if_match=0)
        assert (caught.value.status, caught.value.code) == (412, "precondition_failed")
        before = target.version
        assert target.load_state(document, if_match=before) == before + 1


def test_errors_carry_status_code_and_problem(client: Client) -> None:
    def error_of(call) -> OptservError:
        with pytest.raises(OptservError) as caught:
            call()
        return caught.value

    error = error_of(lambda: client.session("no-such-session"))
    assert (error.status, error.code) == (404, "session_not_found")
    assert error.problem["status"] == 404 and "no-such-session" in error.detail
    assert str(error).startswith("404 session_not_found")

    error = error_of(lambda: client.create_session("adam", {"w": np.zeros(2)}, lr=-1.0))
    assert (error.status, error.code) == (422, "invalid_hyperparameter")
    assert error.problem["field"] == "lr"
    error = error_of(lambda: client.create_session("adamx", {"w": np.zeros(2)}))
    assert (error.status, error.code) == (422, "unknown_optimizer")

    session = client.create_session("adam", {"w": np.zeros(2, np.float32)}, lr=0.1)
    error = error_of(lambda: session.update(betas=(0.9, 2.0)))
    assert (error.status, error.code) == (422, "invalid_hyperparameter")
    error = error_of(lambda: session.push({"nope": np.zeros(2, np.float32)}))
    assert (error.status, error.code) == (422, "unknown_tensor")
    assert error.problem["tensor"] == "nope"
    error = error_of(lambda: session.pull(["w", "nope"]))
    assert (error.status, error.code) == (422, "unknown_tensor")
    error = error_of(lambda: session.push({"w": np.zeros(3, np.float32)}))
    assert (error.status, error.code) == (422, "shape_mismatch")
    error = error_of(lambda: session.put_params({"w": np.zeros(2)}, if_match=7))
    assert (error.status, error.code) == (412, "precondition_failed")
    assert session.info()["version"] == 0  # none of the above changed anything


def test_non_finite_gradients(api_url: str) -> None:
    nan_grad = {"w": np.array([1.0, np.nan], np.float32)}
    with Client(api_url) as client:  # safetensors carries NaN
        rejecting = client.create_session("sgd", {"w": np.ones(2, np.float32)}, lr=0.1)
        with pytest.raises(OptservError) as caught:
            rejecting.push(nan_grad)
        assert (caught.value.status, caught.value.code) == (422, "non_finite")

        skipping = client.create_session(
            "sgd", {"w": np.ones(2, np.float32)}, lr=0.1, nonfinite="skip"
        )
        params = skipping.push(nan_grad)
        result = skipping.last_push
        assert result is not None
        assert (result.applied, result.skipped, result.version) == (False, "non_finite", 0)
        assert same_bits(params["w"], np.ones(2, np.float32))
    with Client(api_url, codec="json") as client:  # JSON cannot: refused before sending
        session = client.session(skipping.id)
        with pytest.raises(WireError, match="NaN or infinity"):
            session.push(nan_grad)


def test_transport_errors_are_optserv_errors() -> None:
    with (
        Client(f"http://127.0.0.1:{free_port()}", timeout=2) as client,
        pytest.raises(OptservError) as caught,
    ):
        client.list_sessions()
    assert caught.value.status is None and caught.value.code == "transport_error"
    assert isinstance(caught.value.__cause__, httpx.TransportError)


def test_million_parameters_round_trip_exactly(api_url: str, rng) -> None:
    w = random_float32_bits(rng, 1_000_000).reshape(1000, 1000)
    w[0, :4] = [0.0, -0.0, np.float32(1e-45), np.finfo(np.float32).max]
    with Client(api_url) as client:
        session = client.create_session("sgd", {"w": w}, lr=0.0)
        assert same_bits(session.pull()["w"], w)
        # lr=0 SGD leaves params as they were: the push answer carries them back unchanged.
        assert same_bits(session.push({"w": np.ones_like(w)})["w"], w)
        replaced = random_float32_bits(rng, 1_000_000).reshape(1000, 1000)
        assert session.put_params({"w": replaced}) == 2
        assert same_bits(session.pull("w")["w"], replaced)
        assert same_bits(session.state()["tensors"]["w"]["param"], replaced)
        session.delete()


def test_json_codec_is_exact(api_url: str, rng) -> None:
    """JSON in, safetensors out and back: no float32 changes on the way (incl. the trap value)."""
    trap = np.array([0x15AE43FD, 0x95AE43FD, 0x00000001, 0x80000000], np.uint32).view(np.float32)
    w = np.concatenate([trap, random_float32_bits(rng, 4096)])
    with Client(api_url, codec="json") as json_client, Client(api_url) as binary_client:
        session = json_client.create_session("sgd", {"w": w}, lr=0.0)
        binary = binary_client.session(session.id)
        assert same_bits(binary.pull()["w"], w)
        assert same_bits(session.pull()["w"], w)
        binary.put_params({"w": w[::-1].copy()})
        assert same_bits(session.pull()["w"], w[::-1])
    spec = json.loads(json.dumps(encode_json_tensor("w", w)))
    assert same_bits(decode_json_tensor("w", spec), w)


def test_zero_dimensional_tensor_push(api_url: str) -> None:
    with Client(api_url) as client:
        session = client.create_session("sgd", {"s": np.float32(2.0)}, lr=0.5)
        assert session.pull()["s"].shape == ()
        assert same_bits(session.push({"s": np.float32(1.0)})["s"], np.float32(1.5))


def test_bearer_header_is_sent() -> None:
    """MockTransport only to see the request headers; no server behaviour is imitated."""
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"sessions": []})

    transport = httpx.MockTransport(handler)
    with Client("http://optserve.test", api_key="s3cret", transport=transport) as client:
        assert client.list_sessions(limit=5) == []
    with Client("http://optserve.test", transport=transport) as client:
        client.list_sessions(limit=5)
    assert seen[0].headers["Authorization"] == "Bearer s3cret"
    assert "Authorization" not in seen[1].headers


# -- the safetensors codec against the safetensors package ----------------------------------------

names = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=12).filter(
    lambda name: name != st_codec.METADATA_KEY
)
float32_arrays = hnp.arrays(
    np.float32,
    hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=5),
    elements=st.floats(width=32),
)
tensor_dicts = st.dictionaries(names, float32_arrays, max_size=4)
metadata_dicts = st.dictionaries(st.text(max_size=8), st.text(max_size=20), max_size=3)
codec_settings = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


def package_metadata(data: bytes) -> dict[str, str]:
    """The package reads metadata only from files."""
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "t.safetensors")
        with open(path, "wb") as file:
            file.write(data)
        with safetensors.safe_open(path, framework="np") as handle:
            return handle.metadata() or {}


@codec_settings
@given(tensors=tensor_dicts, metadata=metadata_dicts)
def test_safetensors_encode_reads_back_with_the_package(tensors, metadata) -> None:
    data = st_codec.encode(tensors, metadata)
    assert_same_tensors(safetensors.numpy.load(data), tensors)
    assert package_metadata(data) == metadata
    header_len = int.from_bytes(data[:8], "little")
    assert header_len % 8 == 0  # the data section is aligned, as the package aligns it


@codec_settings
@given(tensors=tensor_dicts, metadata=metadata_dicts)
def test_safetensors_decode_reads_the_packages_output(tensors, metadata) -> None:
    decoded, decoded_metadata = st_codec.decode(safetensors.numpy.save(tensors, metadata or None))
    assert_same_tensors(decoded, tensors)
    assert decoded_metadata == metadata
    for array in decoded.values():
        assert array.flags.writeable and array.flags.c_contiguous and array.dtype.isnative


def test_safetensors_encode_takes_any_byte_order_and_layout() -> None:
    big_endian = np.arange(6, dtype=">f4").reshape(2, 3)
    strided = np.arange(12, dtype=np.float32).reshape(3, 4)[:, ::2]
    loaded = safetensors.numpy.load(st_codec.encode({"be": big_endian, "strided": strided}))
    assert np.array_equal(loaded["be"], big_endian) and np.array_equal(loaded["strided"], strided)
    for bad in (np.zeros(2, np.float64), np.zeros(2, np.int32), [1.0, 2.0]):
        with pytest.raises(st_codec.SafetensorsError):
            st_codec.encode({"x": bad})  # type: ignore[dict-item]
    with pytest.raises(st_codec.SafetensorsError):
        st_codec.encode({st_codec.METADATA_KEY: np.zeros(1, np.float32)})
    with pytest.raises(st_codec.SafetensorsError):
        st_codec.encode({}, {"k": 1})  # type: ignore[dict-item]


def _body(header: dict[str, Any] | bytes, data: bytes = b"", length: int | None = None) -> bytes:
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    size = len(text) if length is None else length
    return size.to_bytes(8, "little") + text + data


F32 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
F32_TEXT = json.dumps(F32).encode()
MALFORMED = {
    "too short": b"\x01\x00",
    "header longer than body": _body({"x": F32}, b"\x00" * 8, length=500),
    "header over the cap": (200_000_000).to_bytes(8, "little") + b"{}",
    "header not JSON": _body(b"{not json"),
    "header not UTF-8": _body(b'{"\xff": 1}'),
    "header not an object": _body([1, 2]),  # type: ignore[arg-type]
    "metadata not strings": _body({"__metadata__": {"a": 1}}),
    "entry not an object": _body({"x": 3}),
    "not F32": _body({"x": {**F32, "dtype": "F64"}}, b"\x00" * 8),
    "negative dim": _body({"x": {**F32, "shape": [-2]}}, b"\x00" * 8),
    "bool dim": _body({"x": {**F32, "shape": [True, 2]}}, b"\x00" * 8),
    "offsets wrong size": _body({"x": {**F32, "data_offsets": [0, 4]}}, b"\x00" * 4),
    "offsets reversed": _body({"x": {**F32, "data_offsets": [8, 0]}}, b"\x00" * 8),
    "offsets not ints": _body({"x": {**F32, "data_offsets": [0.0, 8.0]}}, b"\x00" * 8),
    "gap": _body({"x": {**F32, "data_offsets": [4, 12]}}, b"\x00" * 12),
    "overlap": _body({"x": F32, "y": F32}, b"\x00" * 16),
    "trailing bytes": _body({"x": F32}, b"\x00" * 9),
    "data missing": _body({"x": F32}, b"\x00" * 4),
    "duplicate name": _body(b'{"x": %s, "x": %s}' % (F32_TEXT, F32_TEXT), b"\x00" * 8),
}


@pytest.mark.parametrize("data", MALFORMED.values(), ids=MALFORMED.keys())
def test_safetensors_decode_rejects_malformed_input(data: bytes) -> None:
    with pytest.raises(st_codec.SafetensorsError):
        st_codec.decode(data)
