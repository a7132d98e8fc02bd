"""Fuzzing both request decoders with bodies that lie: every one is a 4xx, and memory stays bounded.

A body may claim anything: an 8-byte safetensors header length of 2**64 - 1, offsets past its
end or over another tensor's bytes, shapes whose product overflows int64 (or that numpy cannot
index even when a zero dimension makes them empty), JSON shapes of 2**40 x 2**40 next to three
numbers. Each must end as a WireError with a 4xx status (the API's problem+json), never another
exception (a 500), and the decoder must not allocate what the body claims: tracemalloc (numpy
reports its buffers to it) bounds the peak by a small multiple of the body's own size.
"""

from __future__ import annotations

import json
import math
import struct
import tracemalloc
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from optserve.wire import JSON, SAFETENSORS, Message, WireError, decode_message
from optserve.wire.safetensors_codec import MAX_HEADER_BYTES

from .api_helpers import create

ITEMSIZE = {"F32": 4, "F16": 2, "BF16": 2}
#: Dimensions a liar picks: at and past every integer width numpy and JSON readers care about.
HUGE = [2**31, 2**32, 2**40, 2**53 + 1, 2**61, 2**62, 2**63 - 1, 2**63, 2**64 - 1, 2**64, 2**70]
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# -- the property ------------------------------------------------------------------------------


def decode_bounded(decode: Callable[[], Message], body: bytes, per_byte: int) -> Message | None:
    """Run `decode`; the decoded message, or None for a 4xx WireError (any other exception fails
    the test). Its peak allocation must stay within `per_byte` x the body plus 1 MiB."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        try:
            message: Message | None = decode()
        except WireError as error:
            assert 400 <= error.status < 500 and error.code == "invalid_body", error
            message = None
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    assert peak <= per_byte * len(body) + 2**20, f"{peak} bytes allocated for a {len(body)} B body"
    return message


def assert_owned_float32(array: np.ndarray, shape: list[int]) -> None:
    assert array.shape == tuple(shape)
    assert array.dtype == np.float32 and array.dtype.isnative
    assert array.flags.writeable and array.flags.c_contiguous and array.flags.aligned


# -- safetensors --------------------------------------------------------------------------------

LYING_DIMS = st.sampled_from(HUGE) | st.integers(-(2**63), -1) | st.integers(0, 2**64 - 1)
JUNK = st.none() | st.booleans() | st.floats(allow_nan=False) | st.text(max_size=4) | st.just({})
LYING_SHAPES = (
    st.lists(LYING_DIMS, min_size=1, max_size=4)
    | st.lists(st.sampled_from(HUGE), min_size=1, max_size=12).map(lambda s: [0, *s])
    | st.lists(st.integers(0, 3), min_size=65, max_size=70)  # more dimensions than numpy has
    | st.lists(JUNK, min_size=1, max_size=3)
    | JUNK
)


@st.composite
def lying_safetensors(draw: st.DrawFn) -> bytes:
    """A well-formed file (0-3 small tensors of F32/F16/BF16, maybe metadata), then one lie."""
    header: dict[str, Any] = {}
    cursor = 0
    for index in range(draw(st.integers(0, 3))):
        dtype = draw(st.sampled_from(sorted(ITEMSIZE)))
        shape = draw(st.lists(st.integers(0, 4), max_size=3))
        end = cursor + math.prod(shape) * ITEMSIZE[dtype]
        header[f"t{index}"] = {"dtype": dtype, "shape": shape, "data_offsets": [cursor, end]}
        cursor = end
    if draw(st.booleans()):
        header["__metadata__"] = {"version": "3", "worker": '"a"'}
    data = draw(st.binary(min_size=cursor, max_size=cursor))
    names = [name for name in header if name != "__metadata__"] or ["t0"]
    victim = header.setdefault(draw(st.sampled_from(names)), {})
    if not isinstance(victim, dict):
        victim = header[names[0]] = {}
    lie = draw(st.sampled_from(["none", "shape", "offsets", "dtype", "entry", "metadata",
                                "length", "data"]))  # fmt: skip
    if lie == "shape":
        victim["shape"] = draw(LYING_SHAPES)
    elif lie == "offsets":
        size = len(data)
        bound = st.integers(0, size + 8) | st.sampled_from(HUGE) | st.integers(-(2**63), -1)
        victim["data_offsets"] = draw(
            st.lists(bound, min_size=2, max_size=2)  # past the end, reversed, overlapping
            | st.tuples(st.integers(0, size), st.integers(0, 2**64 - 1)).map(list)
            | st.lists(bound, max_size=3)
            | JUNK
        )
    elif lie == "dtype":
        victim["dtype"] = draw(st.sampled_from(["F64", "I32", "U8", "BOOL", "f32", ""]) | JUNK)
    elif lie == "entry":
        header[names[0]] = draw(JUNK | st.lists(st.integers(), max_size=2))
    elif lie == "metadata":
        header["__metadata__"] = draw(
            JUNK | st.dictionaries(st.text(max_size=3), JUNK | st.integers(), max_size=2)
        )
    text = json.dumps(header).encode() + b" " * draw(st.integers(0, 7))
    length = len(text)
    if lie == "length":
        length = draw(
            st.sampled_from([0, 1, len(text) - 1, len(text) + 1, MAX_HEADER_BYTES + 1])
            | st.sampled_from(HUGE[:-2])
            | st.integers(0, 2**64 - 1)
        )
        length = max(0, min(length, 2**64 - 1))
    if lie == "data":
        data = draw(st.sampled_from([data[:-1], data + b"\0\0\0\0", b"", data * 2]))
    return struct.pack("<Q", length) + text + data


def decode_safetensors(body: bytes) -> Message:
    return decode_message(body, SAFETENSORS, "grads", upcast=True)


def check_safetensors(body: bytes) -> None:
    """4xx, or tensors exactly as the header declares them; never more than a few x the body."""
    message = decode_bounded(partial(decode_safetensors, body), body, per_byte=8)
    if message is None:
        return
    header_len = int.from_bytes(body[:8], "little")
    header = json.loads(body[8 : 8 + header_len])
    declared = {name: info for name, info in header.items() if name != "__metadata__"}
    assert sorted(message.tensors) == sorted(declared)
    covered = 0
    for name, info in declared.items():
        assert_owned_float32(message.tensors[name], info["shape"])
        begin, end = info["data_offsets"]
        assert end - begin == math.prod(info["shape"]) * ITEMSIZE[info["dtype"]]
        covered += end - begin
    assert covered == len(body) - 8 - header_len  # the ranges tile the data section


@FUZZ
@given(body=lying_safetensors())
@example(body=struct.pack("<Q", 2**64 - 1) + b"{}")  # a header length no body can have
@example(body=struct.pack("<Q", MAX_HEADER_BYTES) + b"{" * 64)  # a long header, truncated
@example(  # offsets past the end of the body: 1 TiB claimed, 4 bytes sent
    body=struct.pack("<Q", 62)
    + b'{"w":{"dtype":"F32","shape":[262144,1048576],"data_offsets":[0,1099511627776]}}'[:62]
    + b"\0\0\0\0"
)
def test_safetensors_lies_are_4xx_in_bounded_memory(body: bytes) -> None:
    check_safetensors(body)


def safetensors_of(header: dict[str, Any], data: bytes) -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


def test_safetensors_named_lies() -> None:
    """The lies the fuzzer is built around, each spelled out once (and each refused)."""
    f32 = {"dtype": "F32"}
    lies = {
        "header length past the body": struct.pack("<Q", 2**63) + b"{}",
        "overlapping offsets": safetensors_of(
            {"a": {**f32, "shape": [2], "data_offsets": [0, 8]},
             "b": {**f32, "shape": [2], "data_offsets": [4, 12]}}, bytes(12)),
        "offsets past the end": safetensors_of(
            {"a": {**f32, "shape": [2**20], "data_offsets": [0, 2**22]}}, bytes(16)),
        "product past int64": safetensors_of(
            {"a": {**f32, "shape": [2**32, 2**32], "data_offsets": [0, 2**66]}}, bytes(8)),
        "product past int64, wrapping to the body": safetensors_of(
            {"a": {**f32, "shape": [2**62, 4], "data_offsets": [0, 0]}}, b""),
        "empty but unindexable": safetensors_of(
            {"a": {**f32, "shape": [0, 2**62, 2**62], "data_offsets": [0, 0]}}, b""),
        "a dtype that is not a string": safetensors_of(
            {"a": {"dtype": {}, "shape": [1], "data_offsets": [0, 4]}}, bytes(4)),
        "gap between tensors": safetensors_of(
            {"a": {**f32, "shape": [1], "data_offsets": [0, 4]},
             "b": {**f32, "shape": [1], "data_offsets": [8, 12]}}, bytes(12)),
    }  # fmt: skip
    for what, body in lies.items():
        assert decode_bounded(partial(decode_safetensors, body), body, per_byte=8) is None, what


# -- JSON -----------------------------------------------------------------------------------------

NUMBERS = st.integers(-(2**63), 2**64 - 1) | st.floats(allow_nan=False, allow_infinity=False)
ELEMENTS = NUMBERS | st.none() | st.booleans() | st.text(max_size=3) | st.lists(NUMBERS, max_size=2)


@st.composite
def lying_json(draw: st.DrawFn) -> bytes:
    """A push body {"grads": {...}, ...fields}; some tensors honest, some lying."""
    grads: dict[str, Any] = {}
    for index in range(draw(st.integers(0, 3))):
        shape = draw(st.lists(st.integers(0, 4), max_size=3) | LYING_SHAPES)
        honest = isinstance(shape, list) and all(type(d) is int and 0 <= d <= 4 for d in shape)
        count = math.prod(shape) if honest else draw(st.integers(0, 6))
        data = draw(st.lists(NUMBERS if draw(st.booleans()) else ELEMENTS,
                             min_size=count, max_size=count) | JUNK)  # fmt: skip
        spec: dict[str, Any] = {"shape": shape, "data": data}
        if draw(st.integers(0, 9)) == 0:
            spec[draw(st.sampled_from(["dtype", "extra", "shape"]))] = draw(JUNK)
        grads[f"t{index}"] = spec if draw(st.integers(0, 9)) else draw(JUNK)
    body: dict[str, Any] = {"grads": grads if draw(st.integers(0, 9)) else draw(JUNK)}
    if draw(st.booleans()):
        body["base_version"] = draw(NUMBERS)
    text = json.dumps(body).encode()
    cut = draw(st.sampled_from([None] * 8 + [len(text) // 2, len(text) - 1]))
    return text if cut is None else text[:cut]


def check_json(body: bytes) -> None:
    # Python objects for the parsed numbers cost ~32 bytes per number of as little as 2 bytes.
    message = decode_bounded(lambda: decode_message(body, JSON, "grads"), body, per_byte=32)
    if message is None:
        return
    grads = json.loads(body)["grads"]
    assert sorted(message.tensors) == sorted(grads)
    for name, spec in grads.items():
        array = message.tensors[name]
        assert_owned_float32(array, spec["shape"])
        if any(type(x) is int and abs(x) > 2**53 for x in spec["data"]):
            continue  # numpy rounds int64 to float32 once, Python's float() first to a double
        with np.errstate(over="ignore"):
            want = np.array([float(x) for x in spec["data"]], np.float64).astype(np.float32)
        np.testing.assert_array_equal(array.reshape(-1), want)


@FUZZ
@given(body=lying_json())
@example(body=b'{"grads": {"w": {"shape": [1099511627776, 1099511627776], "data": [1, 2, 3]}}}')
@example(body=b'{"grads": {"w": {"shape": [0, 4611686018427387904, 4], "data": []}}}')
@example(body=b'{"grads": {"w": {"shape": [18446744073709551615], "data": []}}}')
@example(body=b'{"grads": {"w": {"shape": [2, 2], "data": [1, 2, 3, 4, 5]}}}')
def test_json_lies_are_4xx_in_bounded_memory(body: bytes) -> None:
    check_json(body)


@FUZZ
@given(body=st.binary(max_size=300), codec=st.sampled_from([JSON, SAFETENSORS]))
def test_any_bytes_are_4xx_in_bounded_memory(body: bytes, codec: str) -> None:
    message = decode_bounded(lambda: decode_message(body, codec, "grads", upcast=True), body, 32)
    if message is not None:  # e.g. b"{}" as safetensors: a file with no tensors
        assert all(a.dtype == np.float32 for a in message.tensors.values())


# -- the same lies over HTTP ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def http(api_server) -> Iterator[tuple[httpx.Client, str]]:
    """One live session for every example; its tensor `w` is named in no fuzzed body (they name
    theirs t0-t2), so even a body that decodes cleanly cannot step it."""
    with httpx.Client(base_url=api_server.url, timeout=30) as client:
        yield (
            client,
            create(client, {"name": "sgd", "lr": 0.5}, {"w": np.zeros(4, np.float32)})["id"],
        )


BODIES = (
    lying_safetensors().map(lambda body: (body, SAFETENSORS))
    | lying_json().map(lambda body: (body, JSON))
    | st.binary(max_size=64).map(lambda body: (body, JSON))
)


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(case=BODIES, swap=st.booleans())
def test_lies_pushed_to_a_live_server_are_4xx_problems_and_change_nothing(
    http: tuple[httpx.Client, str], case: tuple[bytes, str], swap: bool
) -> None:
    """Through uvicorn, read_body and the route too, sent as its own media type or the other."""
    client, sid = http
    body, media_type = case
    if swap:
        media_type = JSON if media_type == SAFETENSORS else SAFETENSORS
    response = client.post(
        f"/v1/sessions/{sid}/gradients", content=body, headers={"content-type": media_type}
    )
    assert 400 <= response.status_code < 500, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    assert client.get(f"/v1/sessions/{sid}").json()["version"] == 0
