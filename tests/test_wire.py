"""Wire codecs: exact round trips in JSON and safetensors, every rejection path, negotiation."""

from __future__ import annotations

import json
import os
import struct
from typing import Any

import numpy as np
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from optserve.wire import (
    JSON,
    SAFETENSORS,
    Message,
    SafetensorsOut,
    WireError,
    choose_response_type,
    decode_json_object,
    decode_json_tensor,
    decode_message,
    encode_json,
    encode_json_tensor,
    encode_message,
    request_media_type,
)
from optserve.wire.json_codec import DOUBLE_ROUNDING_TRAPS

CODECS = [JSON, SAFETENSORS]
SHAPES = [(), (0,), (1,), (5,), (2, 3), (0, 4), (2, 3, 4), (2, 0, 3), (1, 2, 3, 4)]
TRAP = int(DOUBLE_ROUNDING_TRAPS.view(np.uint32)[0])


def bits(array: np.ndarray) -> np.ndarray:
    """Bit patterns, so that -0.0 != 0.0 and NaN payloads compare exactly."""
    return np.ascontiguousarray(array, dtype=np.float32).view(np.uint32)


def assert_same(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert sorted(got) == sorted(want)  # safetensors writers sort names; order carries nothing
    for name, array in want.items():
        out = got[name]
        assert out.shape == array.shape, name
        np.testing.assert_array_equal(bits(out), bits(array))
        assert_owned_float32(out)


def assert_owned_float32(array: np.ndarray) -> None:
    """What the optimizer core relies on: it may update decoded arrays in place."""
    assert array.dtype == np.float32 and array.dtype.isnative
    assert array.flags.writeable and array.flags.c_contiguous and array.flags.aligned


def roundtrip(tensors: dict[str, np.ndarray], fields: dict[str, Any], media_type: str) -> Message:
    body = encode_message(tensors, fields, "params", media_type)
    return decode_message(body, media_type, "params")


def random_finite(count: int, seed: int) -> np.ndarray:
    """Uniformly random bit patterns: subnormals, both zeros and huge values included."""
    values = np.random.default_rng(seed).integers(0, 2**32, count, dtype=np.uint32).view(np.float32)
    return values[np.isfinite(values)]


SPECIALS = np.array(
    [0.0, -0.0, 1.0, -1.0, 0.1, 1 / 3, np.pi, 1e-45, -1e-45, 1.1754942e-38, 1.1754944e-38,
     3.4028235e38, -3.4028235e38, 16777217.0, 2.0**-149, 2.0**127],
    dtype=np.float32,
)  # fmt: skip


def raw_safetensors(header: Any, data: bytes = b"", length: int | None = None) -> bytes:
    """A safetensors body built by hand, so tests can lie in any part of it."""
    text = header if isinstance(header, bytes) else orjson.dumps(header)
    return struct.pack("<Q", len(text) if length is None else length) + text + data


def f32_entry(shape: list[int], begin: int, end: int, dtype: str = "F32") -> dict[str, Any]:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


def expect_error(code: str, body: bytes, content_type: str | None = JSON) -> WireError:
    with pytest.raises(WireError) as info:
        decode_message(body, content_type, "grads")
    assert info.value.code == code
    return info.value


# --- round trips ---------------------------------------------------------------------------


@pytest.mark.parametrize("media_type", CODECS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_roundtrip_shapes(media_type: str, shape: tuple[int, ...]) -> None:
    size = int(np.prod(shape))
    array = np.arange(size, dtype=np.float32).reshape(shape) - 2.5
    message = roundtrip({"w": array, "b": array * 2}, {"version": 7}, media_type)
    assert_same(message.tensors, {"w": array, "b": array * 2})
    assert message.fields == {"version": 7}


@pytest.mark.parametrize("media_type", CODECS)
def test_roundtrip_no_tensors(media_type: str) -> None:
    message = roundtrip({}, {"version": 1, "worker": "a"}, media_type)
    assert message.tensors == {}
    assert message.fields == {"version": 1, "worker": "a"}


@pytest.mark.parametrize("media_type", CODECS)
def test_roundtrip_one_million_random_bits(media_type: str) -> None:
    values = random_finite(1_000_000, seed=1)
    array = np.concatenate([values, SPECIALS, DOUBLE_ROUNDING_TRAPS, -DOUBLE_ROUNDING_TRAPS])
    message = roundtrip({"big": array, "small": SPECIALS}, {"version": 3}, media_type)
    assert_same(message.tensors, {"big": array, "small": SPECIALS})


@pytest.mark.parametrize("media_type", CODECS)
def test_encoder_accepts_any_float32_layout(media_type: str) -> None:
    base = np.arange(12, dtype=np.float32).reshape(3, 4)
    layouts = {"transposed": base.T, "strided": base[:, ::2], "swapped": base.astype(">f4")}
    message = roundtrip(layouts, {}, media_type)
    assert_same(message.tensors, {k: np.ascontiguousarray(v) for k, v in layouts.items()})


def test_json_layout_is_documented_shape() -> None:
    body = encode_message({"w": np.array([[1.5, -2]], np.float32)}, {"v": 2}, "grads", JSON)
    assert orjson.loads(body) == {"v": 2, "grads": {"w": {"shape": [1, 2], "data": [1.5, -2.0]}}}


def test_json_float32_text_is_exact_for_any_double_based_reader() -> None:
    """Clients (JSON.parse, Python's json) read doubles and round to float32 themselves."""
    array = np.concatenate([random_finite(20_000, seed=2), SPECIALS, DOUBLE_ROUNDING_TRAPS])
    body = encode_message({"w": array, "t": -DOUBLE_ROUNDING_TRAPS}, {}, "params", JSON)
    parsed = json.loads(body)["params"]
    for name, want in (("w", array), ("t", -DOUBLE_ROUNDING_TRAPS)):
        got = np.array(parsed[name]["data"], dtype=np.float64).astype(np.float32)
        np.testing.assert_array_equal(bits(got), bits(want))


def test_double_rounding_trap_is_real_and_escaped() -> None:
    """Why the trap table exists: the shortest float32 text reads back as the next float32."""
    trap = DOUBLE_ROUNDING_TRAPS[0]
    shortest = orjson.dumps(DOUBLE_ROUNDING_TRAPS, option=orjson.OPT_SERIALIZE_NUMPY)
    assert shortest == b"[7.038531e-26]"
    assert np.float32(float("7.038531e-26")).view(np.uint32) == TRAP + 1
    # Only the tensor holding it switches to float64 text; others stay short.
    body = encode_message(
        {"t": np.array([trap, 0.1], np.float32), "u": np.array([0.1], np.float32)},
        {},
        "g",
        JSON,
    )
    data = orjson.loads(body)["g"]
    assert np.float32(data["t"]["data"][0]).view(np.uint32) == TRAP
    assert b'"data":[0.1]' in body


@pytest.mark.skipif(
    not os.environ.get("OPTSERVE_WIRE_EXHAUSTIVE"),
    reason="checks all 2**31 float32 magnitudes (minutes); set OPTSERVE_WIRE_EXHAUSTIVE=1",
)
def test_exhaustive_double_rounding_traps() -> None:
    """Every positive finite float32 through orjson's float32 text and back through a double:
    the failures must be exactly DOUBLE_ROUNDING_TRAPS (the encoder escapes those)."""
    found: list[int] = []
    chunk = 1 << 22
    for start in range(0, 0x7F800000, chunk):
        pattern = np.arange(start, min(start + chunk, 0x7F800000), dtype=np.uint32)
        text = orjson.dumps(pattern.view(np.float32), option=orjson.OPT_SERIALIZE_NUMPY)
        back = np.asarray(orjson.loads(text)).astype(np.float32).view(np.uint32)
        found.extend(pattern[back != pattern].tolist())
    assert found == DOUBLE_ROUNDING_TRAPS.view(np.uint32).tolist()


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_json_refuses_non_finite(value: float) -> None:
    array = np.array([1.0, value], dtype=np.float32)
    with pytest.raises(WireError) as info:
        encode_message({"w": array}, {}, "params", JSON)
    assert info.value.code == "not_representable" and info.value.status == 406
    assert "'w'" in info.value.detail


def test_safetensors_carries_non_finite_bits() -> None:
    array = np.array([np.nan, np.inf, -np.inf, 0.0], dtype=np.float32)
    array.view(np.uint32)[0] = 0x7FC00123  # a NaN with a payload
    assert_same(roundtrip({"w": array}, {}, SAFETENSORS).tensors, {"w": array})


@pytest.mark.parametrize("media_type", CODECS)
@pytest.mark.parametrize(
    "array", [np.zeros(2, np.float64), np.zeros(2, np.int32), np.zeros(2, np.float16), [1.0]]
)
def test_encoder_refuses_non_float32(media_type: str, array: Any) -> None:
    with pytest.raises(TypeError, match="'w'"):
        encode_message({"w": array}, {}, "params", media_type)


def test_encoder_programming_errors() -> None:
    with pytest.raises(ValueError, match="collides"):
        encode_message({}, {"params": 1}, "params", JSON)
    with pytest.raises(ValueError, match="media type"):
        encode_message({}, {}, "params", "text/csv")
    with pytest.raises(WireError) as info:
        encode_message({"__metadata__": np.zeros(1, np.float32)}, {}, "p", SAFETENSORS)
    assert info.value.code == "not_representable"


# --- fields --------------------------------------------------------------------------------


FIELDS = {
    "version": 12,
    "base_version": None,
    "lr": 0.001,
    "worker": "a",
    "flag": True,
    "nested": {"k": [1, 2.5, "x"]},
    "numeric_text": "5",
    "empty": "",
}


@pytest.mark.parametrize("media_type", CODECS)
def test_fields_roundtrip(media_type: str) -> None:
    assert roundtrip({}, FIELDS, media_type).fields == FIELDS


def test_safetensors_fields_are_json_text_in_metadata() -> None:
    body = encode_message({}, {"version": 3, "worker": "a"}, "p", SAFETENSORS)
    header_len = struct.unpack("<Q", body[:8])[0]
    assert orjson.loads(body[8 : 8 + header_len])["__metadata__"] == {
        "version": "3",
        "worker": '"a"',
    }


def test_safetensors_bare_metadata_strings() -> None:
    """Clients in other languages may write metadata without JSON quoting."""
    metadata = {"worker": "a", "version": "3", "note": "not json {", "quoted": '"3"', "e": ""}
    body = st_save({"w": np.ones(2, np.float32)}, metadata=metadata)
    message = decode_message(body, SAFETENSORS, "grads")
    assert message.fields == {
        "worker": "a",
        "version": 3,
        "note": "not json {",
        "quoted": "3",
        "e": "",
    }
    assert_same(message.tensors, {"w": np.ones(2, np.float32)})


def test_reads_files_written_by_the_safetensors_package() -> None:
    tensors = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "": np.ones(0, np.float32)}
    assert_same(decode_message(st_save(tensors), SAFETENSORS, "g").tensors, tensors)


def test_safetensors_output_is_readable_by_the_package() -> None:
    tensors = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": SPECIALS}
    loaded = st_load(encode_message(tensors, {"v": 1}, "g", SAFETENSORS))
    assert sorted(loaded) == ["a", "b"]
    for name, array in tensors.items():
        np.testing.assert_array_equal(bits(loaded[name]), bits(array))


def test_unaligned_safetensors_data_comes_back_aligned() -> None:
    """Other writers need not pad the header, so the data may start at an odd offset."""
    data = np.array([1.5, -2.0, 3.25], np.float32).tobytes()
    header = orjson.dumps({"w": f32_entry([3], 0, 12)})
    header += b" " * ((1 - 8 - len(header)) % 4)  # the data starts 1 byte past a 4-byte boundary
    assert (8 + len(header)) % 4 == 1
    message = decode_message(raw_safetensors(header, data), SAFETENSORS, "g")
    assert_same(message.tensors, {"w": np.array([1.5, -2.0, 3.25], np.float32)})


def test_decoded_tensors_do_not_alias_each_other_or_the_body() -> None:
    body = encode_message(
        {"a": np.ones(4, np.float32), "b": np.ones(4, np.float32)}, {}, "g", SAFETENSORS
    )
    tensors = decode_message(body, SAFETENSORS, "g").tensors
    tensors["a"] += 1
    assert tensors["b"].tolist() == [1.0] * 4
    assert decode_message(body, SAFETENSORS, "g").tensors["a"].tolist() == [1.0] * 4


def test_a_writable_body_lends_its_aligned_float32_data_to_the_tensors() -> None:
    """The API reads a large body into a buffer of its own: decoding views it instead of copying
    (one 4 MB copy less per push at 1e6). A read-only body still gets owned copies."""
    tensors = {"a": np.arange(4, dtype=np.float32), "b": np.ones((2, 3), np.float32)}
    body = encode_message(tensors, {"v": 1}, "g", SAFETENSORS)
    buffer = memoryview(bytearray(body))
    decoded = decode_message(buffer, SAFETENSORS, "g").tensors
    assert_same(decoded, tensors)
    for array in decoded.values():
        assert np.shares_memory(array, np.frombuffer(buffer, np.uint8))
        assert array.flags.writeable and array.flags.aligned and array.flags.c_contiguous
    decoded["a"] += 1  # a view of this request's own buffer: nothing else sees it
    assert decoded["b"].tolist() == [[1.0] * 3] * 2
    assert not np.shares_memory(decode_message(body, SAFETENSORS, "g").tensors["a"], decoded["a"])


def test_a_writable_body_with_unaligned_or_half_data_is_copied() -> None:
    data = np.array([1.5, -2.0, 3.25], np.float32).tobytes()
    header = orjson.dumps({"w": f32_entry([3], 0, 12)})
    header += b" " * ((1 - 8 - len(header)) % 4)
    buffer = bytearray(raw_safetensors(header, data))
    tensors = decode_message(buffer, SAFETENSORS, "g").tensors
    assert_same(tensors, {"w": np.array([1.5, -2.0, 3.25], np.float32)})
    assert tensors["w"].flags.aligned
    assert not np.shares_memory(tensors["w"], np.frombuffer(buffer, np.uint8))
    half = bytearray(st_save({"h": np.array([0.5, 2.0], np.float16)}))
    widened = decode_message(half, SAFETENSORS, "g", upcast=True).tensors["h"]
    assert widened.dtype == np.float32 and widened.tolist() == [0.5, 2.0]


def test_safetensors_out_is_a_body_written_in_place() -> None:
    """A push's params are copied once, into the response body: the header goes in last, in
    room padded with spaces, and the package (the Rust reader) and our decoder both read it."""
    out = SafetensorsOut()
    arrays = out.allocate({"w": (2, 3), "b": (5,), "s": ()})
    assert sorted(arrays) == ["b", "s", "w"]
    values = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": SPECIALS[:5].copy()}
    values["s"] = np.array(7.5, np.float32)
    for name, value in values.items():
        np.copyto(arrays[name], value)
    body = out.finish(arrays, {"version": 12, "applied": True, "lr": 0.001})
    assert body is not None
    raw = bytes(body)
    header_len = int.from_bytes(raw[:8], "little")
    assert (8 + header_len) % 8 == 0  # aligned data, as the package lays it out
    assert raw[8 : 8 + header_len].endswith(b" ")
    loaded = st_load(raw)
    for name, value in values.items():
        np.testing.assert_array_equal(bits(loaded[name]), bits(value))
    message = decode_message(raw, SAFETENSORS, "params")
    assert message.fields == {"version": 12, "applied": True, "lr": 0.001}
    assert_same(message.tensors, values)


def test_safetensors_out_declines_what_it_did_not_allocate_or_cannot_fit() -> None:
    out = SafetensorsOut(metadata_room=64)
    arrays = out.allocate({"w": (3,)})
    assert out.finish({"w": np.zeros(3, np.float32)}, {}) is None  # not its array
    assert out.finish({}, {}) is None
    assert out.finish(arrays, {"detail": "x" * 200}) is None  # the fields outgrow the room
    again = out.allocate({"w": (3,)})  # an engine that runs a batch again allocates again
    assert out.finish(arrays, {}) is None
    np.copyto(again["w"], [1, 2, 3])
    body = out.finish(again, {"version": 1})
    assert body is not None and st_load(bytes(body))["w"].tolist() == [1.0, 2.0, 3.0]
    assert SafetensorsOut().finish({}, {}) is None  # nothing allocated


# --- JSON rejections -----------------------------------------------------------------------


def grads(spec: Any) -> bytes:
    return orjson.dumps({"grads": {"w": spec}})


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        (b"", "empty"),
        (b"{", "not valid JSON"),
        (b'{"grads": {}} x', "not valid JSON"),
        (b"\xff\xfe", "not valid JSON"),
        (b'{"grads": {"w": {"shape": [1], "data": [NaN]}}}', "not valid JSON"),
        (b'{"grads": {"w": {"shape": [1], "data": [1e400]}}}', "not valid JSON"),
        (b"[]", "must be a JSON object, not an array"),
        (b"3", "must be a JSON object, not a number"),
        (b'"x"', "must be a JSON object, not a string"),
        (b"null", "must be a JSON object, not null"),
        (b'{"version": 1}', "missing 'grads'"),
        (b'{"grads": []}', "must be an object of named tensors"),
        (b'{"grads": null}', "must be an object of named tensors"),
        (grads([1.0]), "must be an object with shape and data"),
        (grads({"data": [1.0]}), "missing 'shape'"),
        (grads({"shape": [1]}), "missing 'data'"),
        (grads({"shape": [1], "data": [1.0], "extra": 1}), "unknown members ['extra']"),
        (grads({"shape": [1], "data": [1.0], "dtype": "float16"}), "dtype 'float16'"),
        (grads({"shape": 3, "data": [1.0, 2, 3]}), "shape must be an array"),
        (grads({"shape": [-1], "data": []}), "non-negative"),
        (grads({"shape": [1.0], "data": [1.0]}), "non-negative integers"),
        (grads({"shape": [True], "data": [1.0]}), "non-negative integers"),
        (grads({"shape": ["1"], "data": [1.0]}), "non-negative integers"),
        (grads({"shape": [1] * 65, "data": [1.0]}), "65 dimensions"),
        (grads({"shape": [2], "data": "1,2"}), "flat array of numbers, not a string"),
        (grads({"shape": [2], "data": {"0": 1}}), "flat array of numbers, not an object"),
        (grads({"shape": [2, 3], "data": [1.0] * 5}), "needs 6 numbers, data has 5"),
        (grads({"shape": [2], "data": [1.0] * 3}), "needs 2 numbers, data has 3"),
        (grads({"shape": [], "data": []}), "needs 1 numbers, data has 0"),
        (grads({"shape": [0], "data": [1.0]}), "needs 0 numbers, data has 1"),
        (grads({"shape": [2], "data": [1.0, "x"]}), "data[1] is a string"),
        (grads({"shape": [2], "data": ["1.5", "2"]}), "data[0] is a string"),
        (grads({"shape": [2], "data": [1.0, None]}), "data[1] is null"),
        (grads({"shape": [2], "data": [True, False]}), "data[0] is a boolean"),
        (grads({"shape": [3], "data": [0.5, 2.0, True]}), "data[2] is a boolean"),
        (grads({"shape": [3], "data": [0, 2, False]}), "data[2] is a boolean"),
        (grads({"shape": [2], "data": [1.0, {"a": 1}]}), "data[1] is an object"),
        (grads({"shape": [2], "data": [[1.0], [2.0]]}), "not nested arrays"),
        (grads({"shape": [2], "data": [[1.0, 2.0], 3.0]}), "flat array of numbers"),
        (grads({"shape": [2], "data": [1.0, [2.0, 3.0]]}), "flat array of numbers"),
        (grads({"shape": [1], "data": [[]]}), "flat array"),
    ],
)
def test_json_rejects(body: bytes, needle: str) -> None:
    error = expect_error("invalid_body", body)
    assert error.status == 400
    assert needle in error.detail


def test_json_bool_hidden_among_many_zeros() -> None:
    """Both ways of finding a bool: few 0/1 candidates (indexed) and many (one type pass)."""
    many = [0.0] * 1000 + [True]
    few = [0.5] * 1000 + [1.0, False]
    for data in (many, few):
        error = expect_error("invalid_body", grads({"shape": [len(data)], "data": data}))
        assert f"data[{len(data) - 1}] is a boolean" in error.detail
    ok = [0.0] * 1000 + [1, 1.0, 0]
    got = decode_message(grads({"shape": [len(ok)], "data": ok}), None, "grads").tensors["w"]
    assert got.tolist() == ok


def test_json_accepts_integers_and_ignores_harmless_variants() -> None:
    body = orjson.dumps(
        {"grads": {"w": {"shape": [4], "data": [1, -2, 2**63, 2**64 - 1], "dtype": "float32"}}}
    )
    message = decode_message(body, "application/json; charset=utf-8", "grads")
    np.testing.assert_array_equal(
        message.tensors["w"], np.array([1, -2, 2**63, 2**64 - 1], dtype=np.float32)
    )


def test_json_values_beyond_float32_become_infinite() -> None:
    """IEEE rounding of 1e39 to float32 is +inf; the API's finiteness check rejects it."""
    body = grads({"shape": [2], "data": [1e39, -1e39]})
    assert decode_message(body, None, "grads").tensors["w"].tolist() == [np.inf, -np.inf]


def test_json_other_keys_are_fields_and_names_are_free() -> None:
    body = orjson.dumps(
        {
            "worker": "a",
            "grads": {"": {"shape": [], "data": [2]}, "é/x y": {"shape": [0], "data": []}},
        }
    )
    message = decode_message(body, None, "grads")
    assert message.fields == {"worker": "a"}
    assert message.tensors[""].shape == () and message.tensors[""].item() == 2.0
    assert message.tensors["é/x y"].shape == (0,)


# --- safetensors rejections ----------------------------------------------------------------


GOOD_DATA = np.arange(6, dtype=np.float32).tobytes()


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        (b"", "shorter than its 8-byte header length"),
        (b"\x10\x00\x00", "shorter than its 8-byte header length"),
        (raw_safetensors(b"{}", length=1), "not valid UTF-8 JSON"),
        (raw_safetensors(b"{}", length=100), "exceeds the 2 bytes"),
        (raw_safetensors(b"{}", length=2**64 - 1), "exceeds 100000000"),
        (raw_safetensors(b"{}", length=100_000_001), "exceeds 100000000"),
        (raw_safetensors(b"not json"), "not valid UTF-8 JSON"),
        (raw_safetensors(b'{"\xff": 1}'), "not valid UTF-8 JSON"),
        (raw_safetensors(b"[]"), "must be a JSON object"),
        (raw_safetensors(b""), "not valid UTF-8 JSON"),
        (raw_safetensors({"__metadata__": {"v": 1}}), "map strings to strings"),
        (raw_safetensors({"__metadata__": ["v"]}), "map strings to strings"),
        (raw_safetensors({"w": [1]}), "must be an object"),
        (raw_safetensors({"w": {"shape": [1], "data_offsets": [0, 4]}}, GOOD_DATA[:4]), "None"),
        (raw_safetensors({"w": f32_entry([6], 0, 48, "F64")}, GOOD_DATA * 2), "dtype 'F64'"),
        (raw_safetensors({"w": f32_entry([6], 0, 24, "I32")}, GOOD_DATA), "dtype 'I32'"),
        (raw_safetensors({"w": f32_entry([6], 0, 12, "F16")}, GOOD_DATA[:12]), "dtype 'F16'"),
        (raw_safetensors({"w": f32_entry([6], 0, 12, "BF16")}, GOOD_DATA[:12]), "'BF16'"),
        (raw_safetensors({"w": f32_entry([6], 0, 24, "f32")}, GOOD_DATA), "dtype 'f32'"),
        (raw_safetensors({"w": {"dtype": "F32", "data_offsets": [0, 4]}}), "shape must be"),
        (raw_safetensors({"w": f32_entry([-6], 0, 24)}, GOOD_DATA), "non-negative"),
        (raw_safetensors({"w": f32_entry([6.0], 0, 24)}, GOOD_DATA), "non-negative"),
        (raw_safetensors({"w": {"dtype": "F32", "shape": [6]}}, GOOD_DATA), "data_offsets"),
        (raw_safetensors({"w": f32_entry([6], 24, 0)}, GOOD_DATA), "data_offsets"),
        (raw_safetensors({"w": f32_entry([6], -1, 23)}, GOOD_DATA), "data_offsets"),
        (raw_safetensors({"w": f32_entry([5], 0, 24)}, GOOD_DATA), "needs 20 bytes"),
        (raw_safetensors({"w": f32_entry([6], 0, 24)}, GOOD_DATA[:20]), "data section is 20"),
        (raw_safetensors({"w": f32_entry([6], 0, 24)}, GOOD_DATA + b"\0"), "tensors cover 24"),
        (raw_safetensors({"w": f32_entry([5], 4, 24)}, GOOD_DATA), "gap or overlap"),
        (
            raw_safetensors({"w": f32_entry([4], 0, 16), "v": f32_entry([4], 8, 24)}, GOOD_DATA),
            "overlap",
        ),
        (
            raw_safetensors({"w": f32_entry([6], 0, 24), "v": f32_entry([6], 0, 24)}, GOOD_DATA),
            "overlap",
        ),
        (raw_safetensors({"w": f32_entry([6], 24, 48)}, GOOD_DATA), "gap or overlap"),
        (raw_safetensors({"w": f32_entry([10**12], 0, 4 * 10**12)}, GOOD_DATA), "cover"),
        (raw_safetensors({"w": f32_entry([2**40, 2**40], 0, 2**63)}, GOOD_DATA), "needs"),
    ],
)
def test_safetensors_rejects(body: bytes, needle: str) -> None:
    error = expect_error("invalid_body", body, SAFETENSORS)
    assert needle in error.detail


def test_safetensors_truncated_at_every_byte() -> None:
    body = encode_message(
        {"a": SPECIALS, "b": np.ones((2, 2), np.float32)}, {"v": 1}, "g", SAFETENSORS
    )
    for cut in range(len(body)):
        expect_error("invalid_body", body[:cut], SAFETENSORS)


# --- media types ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content_type", "expected"),
    [
        (None, JSON),
        ("", JSON),
        ("application/json", JSON),
        ("Application/JSON; charset=UTF-8", JSON),
        ("application/json;charset=latin-1", JSON),
        ("application/x-safetensors", SAFETENSORS),
        (" APPLICATION/X-SAFETENSORS ; v=2", SAFETENSORS),
    ],
)
def test_request_media_type(content_type: str | None, expected: str) -> None:
    assert request_media_type(content_type) == expected


@pytest.mark.parametrize(
    "content_type",
    ["text/plain", "application/octet-stream", "application/jsonx", "multipart/form-data; b=x",
     "application/problem+json", "json", "*/*"],
)  # fmt: skip
def test_request_media_type_unsupported(content_type: str) -> None:
    with pytest.raises(WireError) as info:
        request_media_type(content_type)
    assert (info.value.code, info.value.status) == ("unsupported_media_type", 415)
    expect_error("unsupported_media_type", b"{}", content_type)


def test_missing_content_type_means_json() -> None:
    message = decode_message(grads({"shape": [1], "data": [1]}), None, "grads")
    assert message.tensors["w"].tolist() == [1.0]


@pytest.mark.parametrize(
    ("accept", "expected"),
    [
        (None, JSON),
        ("", JSON),
        ("*/*", JSON),
        ("application/*", JSON),
        ("application/json", JSON),
        ("application/x-safetensors", SAFETENSORS),
        ("APPLICATION/X-SAFETENSORS", SAFETENSORS),
        ("application/x-safetensors; version=1; q=0.8", SAFETENSORS),
        ("application/x-safetensors, application/json", JSON),
        ("application/json, application/x-safetensors", JSON),
        ("application/x-safetensors, application/json;q=0.9", SAFETENSORS),
        ("application/json;q=0.5, application/x-safetensors;q=0.6", SAFETENSORS),
        ("application/json; charset=utf-8; q=0.5 , application/x-safetensors ;q=0.6", SAFETENSORS),
        ("application/x-safetensors;q=0.5, */*;q=0.1", SAFETENSORS),
        ("application/x-safetensors;q=0.5, */*", JSON),
        ("*/*, application/json;q=0", SAFETENSORS),
        ("application/*, application/json;q=0", SAFETENSORS),
        ("application/x-safetensors, text/html", SAFETENSORS),
        ("text/html, application/json;q=0.1", JSON),
        ("application/*;q=0.2, application/x-safetensors;q=0.1", JSON),
        ("application/x-safetensors;q=0.3, application/*;q=0.2", SAFETENSORS),
        ("application/json;q=0.3, application/json;q=0.7, application/x-safetensors;q=0.5", JSON),
        ("application/x-safetensors;q=1.0, application/json;q=0.999", SAFETENSORS),
        ("garbage", JSON),
        ("application/json;q=2", JSON),
        ("application/json;q=abc, application/x-safetensors", SAFETENSORS),
        ("*/json, application/x-safetensors", SAFETENSORS),
        ("application/x-safetensors;q=nan", JSON),
    ],
)
def test_choose_response_type(accept: str | None, expected: str) -> None:
    assert choose_response_type(accept) == expected


@pytest.mark.parametrize(
    "accept",
    ["text/html", "text/*", "image/png, text/csv;q=0.5", "application/json;q=0",
     "application/json;q=0, application/x-safetensors;q=0", "*/*;q=0",
     "application/*;q=0, */*;q=0.5", "application/json;q=abc, text/html"],
)  # fmt: skip
def test_choose_response_type_not_acceptable(accept: str) -> None:
    with pytest.raises(WireError) as info:
        choose_response_type(accept)
    assert (info.value.code, info.value.status) == ("not_acceptable", 406)


# --- plain JSON helpers and the error type -------------------------------------------------


def test_plain_json_helpers() -> None:
    assert decode_json_object(b'{"lr": 0.1, "x": [1]}') == {"lr": 0.1, "x": [1]}
    for body in (b"", b"[1]", b"{", b"null"):
        with pytest.raises(WireError) as info:
            decode_json_object(body)
        assert info.value.code == "invalid_body"
    body = encode_json(
        {"a": np.arange(3, dtype=np.float32), "b": np.float32(0.5), "c": np.int64(2)}
    )
    assert orjson.loads(body) == {"a": [0.0, 1.0, 2.0], "b": 0.5, "c": 2}


def test_single_tensor_helpers_for_nested_documents() -> None:
    """The state export nests tensors two levels deep; these do one tensor at a time."""
    array = np.concatenate([SPECIALS, DOUBLE_ROUNDING_TRAPS]).reshape(1, -1)
    document = {"tensors": {"w": {"exp_avg": encode_json_tensor("w/exp_avg", array), "step": 3}}}
    parsed = decode_json_object(encode_json(document))
    got = decode_json_tensor("tensors.w.exp_avg", parsed["tensors"]["w"]["exp_avg"])
    assert_same({"w": got}, {"w": array})
    with pytest.raises(WireError, match=r"tensors\.w\.exp_avg: shape"):
        decode_json_tensor("tensors.w.exp_avg", {"shape": "x", "data": []})
    with pytest.raises(WireError) as info:
        encode_json_tensor("w", np.array([np.nan], np.float32))
    assert info.value.code == "not_representable"


def test_wire_error_carries_problem_members() -> None:
    error = WireError("invalid_body", "bad")
    assert (error.code, error.status, error.title, error.detail, str(error)) == (
        "invalid_body", 400, "Malformed request body", "bad", "bad",
    )  # fmt: skip
    with pytest.raises(ValueError):
        WireError("teapot", "x")


# --- properties ----------------------------------------------------------------------------

NAMES = st.text(st.characters(exclude_categories=("Cs",)), min_size=1, max_size=12)
FINITE = hnp.arrays(
    np.float32,
    hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=4),
    elements=st.floats(width=32, allow_nan=False, allow_infinity=False),
)
ANY_BITS = hnp.arrays(
    np.uint32,
    hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=4),
    elements=st.integers(0, 2**32 - 1),
).map(lambda a: a.view(np.float32))
JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(st.characters(exclude_categories=("Cs",))),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(NAMES, inner, max_size=3),
    max_leaves=8,
)
FIELD_MAPS = st.dictionaries(NAMES.filter(lambda k: k != "params"), JSON_VALUES, max_size=4)


@given(tensors=st.dictionaries(NAMES, FINITE, max_size=4), fields=FIELD_MAPS)
def test_property_json_roundtrip(tensors: dict[str, np.ndarray], fields: dict[str, Any]) -> None:
    message = roundtrip(tensors, fields, JSON)
    assert_same(message.tensors, tensors)
    assert message.fields == fields


@given(
    tensors=st.dictionaries(NAMES.filter(lambda n: n != "__metadata__"), ANY_BITS, max_size=4),
    fields=FIELD_MAPS,
)
def test_property_safetensors_roundtrip(
    tensors: dict[str, np.ndarray], fields: dict[str, Any]
) -> None:
    message = roundtrip(tensors, fields, SAFETENSORS)
    assert_same(message.tensors, tensors)
    assert message.fields == fields


@given(body=st.binary(max_size=200), media_type=st.sampled_from(CODECS))
def test_property_garbage_gives_wire_errors_only(body: bytes, media_type: str) -> None:
    try:
        decode_message(body, media_type, "grads")
    except WireError as error:
        assert error.code == "invalid_body"


@st.composite
def damaged_safetensors(draw: st.DrawFn) -> tuple[bytes, bool]:
    """A header built entry by entry with some lies in it; returns (body, all dtypes F32)."""
    entries: dict[str, dict[str, Any]] = {}
    cursor = 0
    for index in range(draw(st.integers(0, 3))):
        shape = draw(st.lists(st.integers(0, 3), max_size=3))
        dtype = draw(st.sampled_from(["F32", "F32", "F32", "F64", "I32", "F16"]))
        size = {"F32": 4, "F64": 8, "I32": 4, "F16": 2}[dtype] * int(np.prod(shape))
        begin = cursor + draw(st.sampled_from([0, 0, 0, -4, 4, 1]))
        end = begin + size + draw(st.sampled_from([0, 0, 0, 4, -4]))
        entries[f"t{index}"] = {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}
        cursor = max(cursor, end)
    if draw(st.booleans()):
        entries["__metadata__"] = {"v": draw(st.sampled_from(["1", "a", '"a"']))}
    data_len = max(cursor + draw(st.sampled_from([0, 0, 0, 4, -4, -1])), 0)
    header = orjson.dumps(entries) + b" " * draw(st.integers(0, 7))
    length = len(header) + draw(st.sampled_from([0, 0, 0, 0, 1, -1, 10_000]))
    data = draw(st.binary(min_size=data_len, max_size=data_len))
    body = struct.pack("<Q", max(length, 0)) + header + data
    cut = draw(st.sampled_from([None, None, None, len(body) // 2, len(body) - 1]))
    body = body if cut is None else body[:cut]
    f32_only = all(e["dtype"] == "F32" for k, e in entries.items() if k != "__metadata__")
    return body, f32_only


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(case=damaged_safetensors())
def test_property_agrees_with_the_safetensors_package(case: tuple[bytes, bool]) -> None:
    """Ours accepts exactly what the package's Rust reader accepts, minus non-F32 dtypes."""
    body, f32_only = case
    try:
        reference = st_load(body)
    except Exception:
        reference = None
    try:
        ours = decode_message(body, SAFETENSORS, "grads").tensors
    except WireError:
        ours = None
    if reference is not None and f32_only:
        assert ours is not None
    if ours is not None:
        assert reference is not None and f32_only
        assert sorted(ours) == sorted(reference)
        for name, array in ours.items():
            assert array.shape == reference[name].shape
            np.testing.assert_array_equal(bits(array), bits(reference[name]))
