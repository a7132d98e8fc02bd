"""The cheaper wire: F16/BF16 gradients upcast on arrival, BF16 params on request.

torch is the reference for every conversion: the safetensors package writes the half-precision
bodies from torch tensors (safetensors.torch.save), torch's `.float()` is the upcast to match, and
torch's `.to(torch.bfloat16)` is the rounding to match; BF16 responses are read back with
safetensors.torch.load.
"""

from __future__ import annotations

import os
import struct
from typing import Any

import httpx
import numpy as np
import orjson
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load as torch_load
from safetensors.torch import save as torch_save

from optserve.wire import (
    BF16,
    F32,
    JSON,
    SAFETENSORS,
    ResponseFormat,
    WireError,
    choose_response_format,
    choose_response_type,
    decode_message,
    encode_message,
)
from optserve.wire.safetensors_codec import float32_to_bf16_bits

from .api_helpers import ST, assert_problem, create, st_body, st_parse, state
from .test_wire import assert_owned_float32, bits, f32_entry, raw_safetensors

BF16_ST = f"{ST}; dtype=bf16"


# --- references ----------------------------------------------------------------------------


def torch_tensor(array: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """float32 values -> a torch tensor of `dtype` by torch's own rounding."""
    return torch.from_numpy(np.array(array, dtype=np.float32)).to(dtype)


def torch_bits16(tensor: torch.Tensor) -> np.ndarray:
    """The 16-bit patterns of an F16/BF16 tensor."""
    return tensor.contiguous().view(torch.int16).numpy().view(np.uint16)


def from_bits16(words: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(words, np.uint16).view(np.int16)).view(dtype)


def torch_upcast(tensor: torch.Tensor) -> np.ndarray:
    return tensor.float().numpy()


def assert_bits_equal_except_nan_bits(got: np.ndarray, want: np.ndarray) -> None:
    """Bit-exact, except that a NaN only has to be a NaN: torch's NaN bits depend on the code
    path (vectorised or scalar; 0xFFFF, 0x7FC0, 0x7FFFFFFF, payload kept or not), so they are
    no reference. The NaN tests below pin our own NaN bits."""
    got_bits, want_bits = bits(got).reshape(-1), bits(want).reshape(-1)
    nan = np.isnan(want.reshape(-1))
    np.testing.assert_array_equal(np.isnan(got.reshape(-1)), nan)
    np.testing.assert_array_equal(got_bits[~nan], want_bits[~nan])


ALL_WORDS = np.arange(1 << 16, dtype=np.uint16)


# --- decoding F16 and BF16 -----------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_every_half_precision_value_upcasts_as_torch_does(dtype: torch.dtype) -> None:
    """All 65536 bit patterns, written by the safetensors package, decode to torch's float32."""
    half = from_bits16(ALL_WORDS, dtype)
    body = torch_save({"g": half.reshape(256, 256)}, metadata={"worker": '"a"'})
    message = decode_message(body, SAFETENSORS, "grads", upcast=True)
    assert message.fields == {"worker": "a"}
    got = message.tensors["g"]
    assert got.shape == (256, 256)
    assert_owned_float32(got)
    assert_bits_equal_except_nan_bits(got, torch_upcast(half).reshape(256, 256))
    # NaN payloads survive: the upcast is a plain widening.
    if dtype == torch.bfloat16:
        np.testing.assert_array_equal(bits(got).reshape(-1), ALL_WORDS.astype(np.uint32) << 16)
    else:
        np.testing.assert_array_equal(bits(got).reshape(-1), bits(ALL_WORDS.view(np.float16)))


def test_signalling_f16_nan_keeps_its_bits() -> None:
    """The one place torch differs: its F16 upcast quiets signalling NaNs (0x7C01 -> 0x7FC02000);
    numpy's (ours) keeps the payload as it is (0x7F802000). Both are NaN, which is all the
    optimizer looks at (non-finite gradients are rejected or skipped)."""
    body = torch_save({"g": from_bits16(np.array([0x7C01, 0xFE00], np.uint16), torch.float16)})
    got = decode_message(body, SAFETENSORS, "grads", upcast=True).tensors["g"]
    assert bits(got).tolist() == [0x7F802000, 0xFFC00000]


def test_mixed_dtypes_and_shapes_in_one_body() -> None:
    rng = np.random.default_rng(3)
    values = {
        "f32": torch.from_numpy(rng.standard_normal((2, 3)).astype(np.float32)),
        "f16": torch.from_numpy(rng.standard_normal((4, 1, 2)).astype(np.float32)).half(),
        "bf16": torch.from_numpy(rng.standard_normal(5).astype(np.float32)).bfloat16(),
        "scalar_bf16": torch.tensor(-1.5, dtype=torch.bfloat16),
        "scalar_f16": torch.tensor(65504.0, dtype=torch.float16),
        "empty_bf16": torch.zeros((0, 3), dtype=torch.bfloat16),
        "empty_f16": torch.zeros(0, dtype=torch.float16),
    }
    message = decode_message(torch_save(values), SAFETENSORS, "grads", upcast=True)
    assert sorted(message.tensors) == sorted(values)
    for name, tensor in values.items():
        got = message.tensors[name]
        assert got.shape == tuple(tensor.shape), name
        assert_owned_float32(got)
        np.testing.assert_array_equal(bits(got), bits(torch_upcast(tensor)))


def test_decoded_half_tensors_are_owned_and_independent() -> None:
    body = torch_save({"a": torch.ones(4, dtype=torch.bfloat16), "b": torch.ones(4).half()})
    tensors = decode_message(body, SAFETENSORS, "grads", upcast=True).tensors
    tensors["a"] += 1
    tensors["b"] *= 3
    again = decode_message(body, SAFETENSORS, "grads", upcast=True).tensors
    assert again["a"].tolist() == again["b"].tolist() == [1.0] * 4


@pytest.mark.parametrize("dtype", ["F16", "BF16"])
def test_unaligned_half_data(dtype: str) -> None:
    """Another writer's header need not be padded: the data may start at an odd offset."""
    words = np.array([0x3C00, 0xC000, 0x3555] if dtype == "F16" else [0x3F80, 0xC000, 0x3EAB])
    header = orjson.dumps({"w": f32_entry([3], 0, 6, dtype)})
    header += b" " * ((1 - 8 - len(header)) % 4)
    body = raw_safetensors(header, words.astype("<u2").tobytes())
    got = decode_message(body, SAFETENSORS, "grads", upcast=True).tensors["w"]
    assert_owned_float32(got)
    want = from_bits16(words, torch.float16 if dtype == "F16" else torch.bfloat16)
    np.testing.assert_array_equal(bits(got), bits(torch_upcast(want)))


HALF_DATA = np.arange(6, dtype=np.float16).tobytes()  # 12 bytes: six 2-byte values


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        (raw_safetensors({"w": f32_entry([6], 0, 24, "F16")}, HALF_DATA * 2), "needs 12 bytes"),
        (raw_safetensors({"w": f32_entry([3], 0, 12, "BF16")}, HALF_DATA), "BF16 needs 6 bytes"),
        (raw_safetensors({"w": f32_entry([6], 0, 12, "BF16")}, HALF_DATA[:10]), "data section"),
        (raw_safetensors({"w": f32_entry([6], 0, 12, "bf16")}, HALF_DATA), "dtype 'bf16'"),
        (raw_safetensors({"w": f32_entry([6], 0, 12, "I16")}, HALF_DATA), "dtype 'I16'"),
        (raw_safetensors({"w": f32_entry([6], 0, 12, "U16")}, HALF_DATA), "dtype 'U16'"),
        (raw_safetensors({"w": f32_entry([6], 0, 48, "F64")}, HALF_DATA * 4), "dtype 'F64'"),
        (raw_safetensors({"w": f32_entry([6], 0, 6, "F8_E4M3")}, HALF_DATA[:6]), "'F8_E4M3'"),
        (raw_safetensors({"w": f32_entry([12], 0, 12, "BOOL")}, HALF_DATA), "dtype 'BOOL'"),
        (raw_safetensors({"w": {"shape": [6], "data_offsets": [0, 12]}}, HALF_DATA), "None"),
        (
            raw_safetensors({"w": f32_entry([2**40, 2**40], 0, 2**63, "BF16")}, HALF_DATA),
            "needs",
        ),
        (raw_safetensors({"w": f32_entry([10**12], 0, 2 * 10**12, "F16")}, HALF_DATA), "cover"),
    ],
)
def test_half_bodies_are_validated_before_any_allocation(body: bytes, needle: str) -> None:
    with pytest.raises(WireError) as info:
        decode_message(body, SAFETENSORS, "grads", upcast=True)
    assert info.value.code == "invalid_body" and needle in info.value.detail
    assert "'w'" in info.value.detail or "data section" in info.value.detail


@pytest.mark.parametrize("dtype", ["F16", "BF16"])
def test_half_tensors_are_refused_where_not_allowed(dtype: str) -> None:
    """Without upcast (PUT params, PUT state) F16/BF16 is a 400 naming the tensor."""
    body = raw_safetensors({"layer.w": f32_entry([6], 0, 12, dtype)}, HALF_DATA)
    with pytest.raises(WireError) as info:
        decode_message(body, SAFETENSORS, "params")
    assert info.value.code == "invalid_body"
    assert f"'layer.w' has dtype '{dtype}'" in info.value.detail
    assert "only F32" in info.value.detail
    decode_message(body, SAFETENSORS, "params", upcast=True)  # fine where allowed


def test_half_body_truncated_at_every_byte() -> None:
    body = torch_save(
        {"a": torch.arange(5).bfloat16(), "b": torch.ones(2, 2).half()}, metadata={"v": "1"}
    )
    decode_message(body, SAFETENSORS, "grads", upcast=True)
    for cut in range(len(body)):
        with pytest.raises(WireError):
            decode_message(body[:cut], SAFETENSORS, "grads", upcast=True)


_SIZES = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8, "I16": 2}


@st.composite
def damaged_half_safetensors(draw: st.DrawFn) -> tuple[bytes, bool]:
    """Like test_wire's damaged bodies, with F16/BF16 among the dtypes; (body, dtypes all ok)."""
    entries: dict[str, dict[str, Any]] = {}
    cursor = 0
    for index in range(draw(st.integers(0, 3))):
        shape = draw(st.lists(st.integers(0, 3), max_size=3))
        dtype = draw(st.sampled_from(["F32", "F16", "BF16", "F16", "BF16", "F64", "I16"]))
        size = _SIZES[dtype] * int(np.prod(shape))
        begin = cursor + draw(st.sampled_from([0, 0, 0, -2, 2, 1]))
        end = begin + size + draw(st.sampled_from([0, 0, 0, 2, -2]))
        entries[f"t{index}"] = {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}
        cursor = max(cursor, end)
    data_len = max(cursor + draw(st.sampled_from([0, 0, 0, 2, -2, -1])), 0)
    header = orjson.dumps(entries) + b" " * draw(st.integers(0, 7))
    length = len(header) + draw(st.sampled_from([0, 0, 0, 0, 1, -1]))
    data = draw(st.binary(min_size=data_len, max_size=data_len))
    body = struct.pack("<Q", max(length, 0)) + header + data
    ok = all(e["dtype"] in ("F32", "F16", "BF16") for e in entries.values())
    return body, ok


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(case=damaged_half_safetensors())
def test_property_half_decoding_agrees_with_the_package_and_torch(case: tuple[bytes, bool]) -> None:
    """Ours (upcast) accepts exactly what the package accepts, minus other dtypes, and gives
    torch's float32 upcast of what the package reads."""
    body, dtypes_ok = case
    try:
        reference = {k: torch_upcast(v) for k, v in torch_load(body).items()}
    except Exception:
        reference = None
    try:
        ours = decode_message(body, SAFETENSORS, "grads", upcast=True).tensors
    except WireError:
        ours = None
    if reference is not None and dtypes_ok:
        assert ours is not None
    if ours is not None:
        assert reference is not None and dtypes_ok
        assert sorted(ours) == sorted(reference)
        for name, array in ours.items():
            assert array.shape == reference[name].shape
            assert_owned_float32(array)
            assert_bits_equal_except_nan_bits(array, reference[name])


# --- encoding BF16 -------------------------------------------------------------------------


def _patterns(uppers: np.ndarray, lowers: list[int]) -> np.ndarray:
    words = uppers.astype(np.uint32)[:, None] << 16 | np.array(lowers, np.uint32)[None, :]
    return words.reshape(-1).view(np.float32)


# For every one of the 65536 upper halves: exact, just above and below the tie, the tie itself
# (rounding to even decides), the largest and smallest lower halves, and two random ones.
LOWERS = [0x0000, 0x0001, 0x7FFF, 0x8000, 0x8001, 0xFFFF, 0x1234, 0xBEEF]
EDGE_CASES = np.array(
    [0x3F808000, 0x3F818000, 0x3F807FFF, 0x3F808001,  # ties to even (down, up) and near ties
     0x00000001, 0x00008000, 0x00018000, 0x007FFFFF, 0x807FFFFF, 0x00007FFF,  # subnormals
     0x007F8000, 0x007FFFFF,  # the largest subnormals round up to the smallest normal
     0x7F7FFFFF, 0x7F7F7FFF, 0x7F7F8000, 0xFF7F8000,  # overflow to +-inf, or stay finite
     0x7F800000, 0xFF800000, 0x00000000, 0x80000000,  # infinities and zeros
     0x7FC00000, 0xFFC00000, 0x7F800001, 0x7F80FFFF, 0xFF800001, 0x7FFFFFFF, 0xFFFFFFFF],  # NaN
    dtype=np.uint32,
).view(np.float32)  # fmt: skip


def test_bf16_rounding_equals_torch_on_every_upper_half_and_the_edge_cases() -> None:
    values = np.concatenate([_patterns(ALL_WORDS, LOWERS), EDGE_CASES])
    got = float32_to_bf16_bits(values)
    assert got.dtype == np.dtype("<u2") and got.shape == values.shape
    want = torch_bits16(torch_tensor(values, torch.bfloat16))
    nan = np.isnan(values)
    np.testing.assert_array_equal(got[~nan], want[~nan])
    # Specific expectations, so the reference is not the only witness.
    rounded = float32_to_bf16_bits(EDGE_CASES).tolist()
    check = dict(zip(EDGE_CASES.view(np.uint32).tolist(), rounded, strict=True))
    assert check[0x3F808000] == 0x3F80 and check[0x3F818000] == 0x3F82  # ties to even
    assert check[0x00008000] == 0x0000 and check[0x00018000] == 0x0002
    assert check[0x007FFFFF] == 0x0080 and check[0x7F7FFFFF] == 0x7F80  # up a binade; to inf
    assert check[0x7F7F7FFF] == 0x7F7F and check[0xFF7F8000] == 0xFF80


def test_bf16_nan_stays_nan_with_its_sign_and_top_payload() -> None:
    """torch's NaN bits are no reference (its CPU kernels write 0xFFFF for any NaN); ours keep
    the sign and the payload's top bits and set the quiet bit, so no NaN becomes infinity."""
    nans = np.array(
        [0x7FC00000, 0xFFC00000, 0x7F800001, 0xFF800001, 0x7F80FFFF, 0x7FA12345, 0xFFFFFFFF],
        np.uint32,
    )
    got = float32_to_bf16_bits(nans.view(np.float32))
    assert got.tolist() == [0x7FC0, 0xFFC0, 0x7FC0, 0xFFC0, 0x7FC0, 0x7FE1, 0xFFFF]
    assert torch.from_numpy(got.view(np.int16)).view(torch.bfloat16).isnan().all()


def test_bf16_rounding_of_random_bits_equals_torch() -> None:
    values = np.random.default_rng(7).integers(0, 2**32, 2_000_000, dtype=np.uint32)
    values = values.view(np.float32)
    want = torch_bits16(torch_tensor(values, torch.bfloat16))
    got = float32_to_bf16_bits(values)
    nan = np.isnan(values)
    np.testing.assert_array_equal(got[~nan], want[~nan])
    assert np.isnan(from_bits16(got[nan], torch.bfloat16).float().numpy()).all()


@pytest.mark.skipif(
    not os.environ.get("OPTSERVE_WIRE_EXHAUSTIVE"),
    reason="checks all 2**32 float32 patterns (minutes); set OPTSERVE_WIRE_EXHAUSTIVE=1",
)
def test_exhaustive_bf16_rounding_equals_torch() -> None:
    chunk = 1 << 24
    for start in range(0, 1 << 32, chunk):
        values = np.arange(start, start + chunk, dtype=np.uint32).view(np.float32)
        got = float32_to_bf16_bits(values)
        want = torch_bits16(torch.from_numpy(values).to(torch.bfloat16))
        nan = np.isnan(values)
        np.testing.assert_array_equal(got[~nan], want[~nan])
        assert ((got[nan] & 0x7F80) == 0x7F80).all() and (got[nan] & 0x007F).all()


def test_bf16_safetensors_is_read_by_the_package_as_torch_rounds() -> None:
    rng = np.random.default_rng(11)
    tensors = {
        "w": rng.standard_normal((3, 5)).astype(np.float32),
        "edges": EDGE_CASES,
        "scalar": np.float32(1 / 3),
        "empty": np.zeros((2, 0), np.float32),
        "é/x y": np.array([1e-40, -0.0], np.float32),
        "transposed": rng.standard_normal((4, 3)).astype(np.float32).T,
        "big_endian": np.arange(4, dtype=">f4") / 3,
    }
    body = encode_message(tensors, {"version": 4, "worker": "a"}, "params", SAFETENSORS, BF16)
    loaded = torch_load(body)
    assert sorted(loaded) == sorted(tensors)
    for name, array in tensors.items():
        got = loaded[name]
        assert got.dtype == torch.bfloat16 and tuple(got.shape) == np.shape(array), name
        want = torch_tensor(array, torch.bfloat16)
        nan = np.isnan(np.asarray(array, np.float32))
        np.testing.assert_array_equal(torch_bits16(got)[~nan], torch_bits16(want)[~nan])
        assert got.float().isnan().numpy().tolist() == nan.tolist()
    # The header: the package's layout (metadata first, padded to 8 bytes), fields as JSON text.
    header_len = int.from_bytes(body[:8], "little")
    assert header_len % 8 == 0
    header = orjson.loads(body[8 : 8 + header_len])
    assert next(iter(header)) == "__metadata__"
    assert header["__metadata__"] == {"version": "4", "worker": '"a"'}
    assert {entry["dtype"] for k, entry in header.items() if k != "__metadata__"} == {"BF16"}
    # And our own decoder reads it back as the upcast of torch's rounding.
    message = decode_message(body, SAFETENSORS, "params", upcast=True)
    assert message.fields == {"version": 4, "worker": "a"}
    for name, array in tensors.items():
        want = torch_upcast(torch_tensor(array, torch.bfloat16))
        assert_bits_equal_except_nan_bits(message.tensors[name], want)


def test_bf16_halves_the_data_section() -> None:
    tensors = {"a": np.ones((100, 10), np.float32), "b": np.ones(24, np.float32)}
    f32 = encode_message(tensors, {"version": 1}, "params", SAFETENSORS)
    bf16 = encode_message(tensors, {"version": 1}, "params", SAFETENSORS, BF16)

    def data_bytes(body: bytes) -> int:
        return len(body) - 8 - int.from_bytes(body[:8], "little")

    assert data_bytes(f32) == 4 * 1024 and data_bytes(bf16) == 2 * 1024


def test_bf16_encoding_refusals() -> None:
    with pytest.raises(WireError) as info:
        encode_message({"__metadata__": np.ones(1, np.float32)}, {}, "p", SAFETENSORS, BF16)
    assert info.value.code == "not_representable"
    with pytest.raises(TypeError):
        encode_message({"w": np.ones(1, np.float64)}, {}, "p", SAFETENSORS, BF16)
    with pytest.raises(ValueError, match="float32 only"):
        encode_message({"w": np.ones(1, np.float32)}, {}, "p", JSON, BF16)
    with pytest.raises(ValueError, match="dtype"):
        encode_message({"w": np.ones(1, np.float32)}, {}, "p", SAFETENSORS, "F16")


# --- negotiation ---------------------------------------------------------------------------

JSON_F = ResponseFormat(JSON)
ST_F32 = ResponseFormat(SAFETENSORS, F32)
ST_BF16 = ResponseFormat(SAFETENSORS, BF16)


@pytest.mark.parametrize(
    ("accept", "dtype", "expected"),
    [
        (None, None, JSON_F),
        ("garbage", None, JSON_F),
        ("*/*", None, JSON_F),
        (ST, None, ST_F32),
        (BF16_ST, None, ST_BF16),
        ('application/x-safetensors; DTYPE="BF16"', None, ST_BF16),
        ("application/x-safetensors;q=0.9;dtype=bf16", None, ST_BF16),
        ("application/x-safetensors; dtype=f32", None, ST_F32),
        (f"{BF16_ST}, {ST};q=0.5", None, ST_BF16),
        (f"{ST};q=0.5, {BF16_ST}", None, ST_BF16),
        (f"{BF16_ST};q=0.5, {ST}", None, ST_F32),
        (f"{BF16_ST}, {ST}", None, ST_F32),  # a tie goes to float32 (lossless)
        (f"{BF16_ST}, application/json", None, JSON_F),  # and JSON beats both
        (f"{BF16_ST}, application/json;q=0.5", None, ST_BF16),
        ("application/x-safetensors; dtype=f16, application/json;q=0.1", None, JSON_F),
        ("application/json; dtype=bf16", None, JSON_F),  # the parameter means nothing on JSON
        ("*/*; dtype=bf16", None, JSON_F),  # nor on wildcards
        ("application/*; dtype=bf16, application/json;q=0", None, ST_F32),
        (None, "bf16", ST_BF16),  # ?dtype=bf16 leaves only BF16 safetensors on offer
        ("*/*", "bf16", ST_BF16),
        ("garbage", "bf16", ST_BF16),
        (ST, "bf16", ST_BF16),
        (f"application/json, {ST};q=0.1", "bf16", ST_BF16),
        (f"{ST}; dtype=f32", "f32", ST_F32),
        (BF16_ST, "bf16", ST_BF16),
        (None, "f32", JSON_F),
        (ST, "f32", ST_F32),
        (f"{BF16_ST}, application/json;q=0.5", "f32", JSON_F),
    ],
)
def test_choose_response_format(accept: str | None, dtype: str | None, expected) -> None:
    assert choose_response_format(accept, dtype) == expected


@pytest.mark.parametrize(
    ("accept", "dtype", "needle"),
    [
        ("application/json", "bf16", "JSON carries float32"),
        ("application/json, text/html", "bf16", "JSON carries float32"),
        (f"{ST};dtype=f32", "bf16", "dtype=bf16"),
        (f"{ST};q=0", "bf16", "dtype=bf16"),
        ("application/x-safetensors; dtype=f16", None, "allows none of"),
        (f"{BF16_ST}", "f32", "application/json, application/x-safetensors; dtype=f32"),
        ("text/html", None, "allows none of"),
    ],
)
def test_choose_response_format_not_acceptable(accept: str, dtype: str | None, needle: str) -> None:
    with pytest.raises(WireError) as info:
        choose_response_format(accept, dtype)
    assert (info.value.code, info.value.status) == ("not_acceptable", 406)
    assert needle in info.value.detail


def test_state_negotiation_ignores_the_dtype_parameter() -> None:
    """The state export is always float32: `choose_response_type` reads no dtype."""
    assert choose_response_type(BF16_ST) == SAFETENSORS
    assert choose_response_type("application/x-safetensors; dtype=f16") == SAFETENSORS
    with pytest.raises(ValueError):
        choose_response_format(None, "f16")  # the route validates ?dtype; this is a bug


# --- over HTTP -----------------------------------------------------------------------------


@pytest.fixture
def client(api_url):
    with httpx.Client(base_url=api_url, timeout=60) as client:
        yield client


ADAM = {"name": "adam", "lr": 0.01, "weight_decay": 0.01}


def _initial() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(21)
    return {
        "w": rng.standard_normal((8, 16)).astype(np.float32),
        "b": rng.standard_normal(16).astype(np.float32),
        "s": np.float32(0.5).reshape(()),
    }


def _push(client: httpx.Client, sid: str, body: bytes, **params: str) -> httpx.Response:
    response = client.post(
        f"/v1/sessions/{sid}/gradients",
        content=body,
        params=params,
        headers={"content-type": ST, "accept": ST},
    )
    assert response.status_code == 200, response.text
    return response


@pytest.mark.parametrize(
    "dtypes",
    [
        {"w": torch.float16, "b": torch.float16, "s": torch.float16},
        {"w": torch.bfloat16, "b": torch.bfloat16, "s": torch.bfloat16},
        {"w": torch.bfloat16, "b": torch.float16, "s": torch.float32},
    ],
    ids=["f16", "bf16", "mixed"],
)
def test_half_gradients_step_exactly_like_their_float32_upcast(client, dtypes) -> None:
    """Two sessions: one gets half-precision gradients, the other torch's float32 upcast of
    them; params, optimizer state and every response agree bit for bit."""
    initial = _initial()
    half_sid = create(client, ADAM, initial)["id"]
    f32_sid = create(client, ADAM, initial)["id"]
    rng = np.random.default_rng(5)
    for step in range(3):
        grads = {
            name: torch.from_numpy(
                np.asarray(rng.standard_normal(np.shape(v)) * 1e-3, np.float32)
            ).to(dtypes[name])
            for name, v in initial.items()
        }
        half_body = torch_save(grads, metadata={"worker": '"h"'})
        f32_body = torch_save({k: v.float() for k, v in grads.items()}, {"worker": '"h"'})
        assert len(half_body) < len(f32_body)
        a, b = _push(client, half_sid, half_body), _push(client, f32_sid, f32_body)
        (a_params, a_fields), (b_params, b_fields) = st_parse(a.content), st_parse(b.content)
        assert a_fields == b_fields and a_fields["version"] == step + 1
        assert sorted(a_params) == sorted(b_params) == sorted(initial)
        for name, values in a_params.items():
            np.testing.assert_array_equal(bits(values), bits(b_params[name]))
    assert state(client, half_sid) == state(client, f32_sid)


def test_half_gradient_errors_over_http(client) -> None:
    sid = create(client, ADAM, _initial())["id"]
    before = state(client, sid)
    wrong = torch_save({"w": torch.zeros((8, 16), dtype=torch.float64)})
    response = client.post(
        f"/v1/sessions/{sid}/gradients", content=wrong, headers={"content-type": ST}
    )
    problem = assert_problem(response, 400, "invalid_body")
    assert "'w' has dtype 'F64'" in problem["detail"]
    shape = torch_save({"w": torch.zeros((4, 16), dtype=torch.bfloat16)})
    response = client.post(
        f"/v1/sessions/{sid}/gradients", content=shape, headers={"content-type": ST}
    )
    assert_problem(response, 422, "shape_mismatch")
    nonfinite = torch_save({"b": torch.full((16,), float("inf")).half()})
    response = client.post(
        f"/v1/sessions/{sid}/gradients", content=nonfinite, headers={"content-type": ST}
    )
    assert_problem(response, 422, "non_finite")
    assert state(client, sid) == before


def test_initial_params_may_be_half_but_put_params_and_state_may_not(client) -> None:
    initial = {"w": torch.randn(4, 4, generator=torch.Generator().manual_seed(1)).bfloat16()}
    body = torch_save(initial, metadata={"optimizer": orjson.dumps(ADAM).decode()})
    response = client.post("/v1/sessions", content=body, headers={"content-type": ST})
    assert response.status_code == 201, response.text
    sid = response.json()["id"]
    assert response.json()["tensors"]["w"] == {"shape": [4, 4], "dtype": "float32"}
    got, _ = st_parse(client.get(f"/v1/sessions/{sid}/params", headers={"accept": ST}).content)
    np.testing.assert_array_equal(bits(got["w"]), bits(torch_upcast(initial["w"])))

    before = state(client, sid)
    half_params = torch_save({"w": torch.ones(4, 4).half()})
    response = client.put(
        f"/v1/sessions/{sid}/params", content=half_params, headers={"content-type": ST}
    )
    assert "'w' has dtype 'F16'" in assert_problem(response, 400, "invalid_body")["detail"]
    exported = client.get(f"/v1/sessions/{sid}/state", headers={"accept": ST}).content
    tensors, fields = st_parse(exported)
    half_state = torch_save(
        {k: torch.from_numpy(v).bfloat16() for k, v in tensors.items()},
        metadata={k: orjson.dumps(v).decode() for k, v in fields.items()},
    )
    response = client.put(
        f"/v1/sessions/{sid}/state", content=half_state, headers={"content-type": ST}
    )
    assert "dtype 'BF16'" in assert_problem(response, 400, "invalid_body")["detail"]
    assert state(client, sid) == before


def _params_bits(response: httpx.Response) -> dict[str, np.ndarray]:
    loaded = torch_load(response.content)
    assert {t.dtype for t in loaded.values()} == {torch.bfloat16}
    return {name: torch_bits16(t) for name, t in loaded.items()}


@pytest.mark.parametrize(
    ("headers", "params"),
    [({"accept": BF16_ST}, {}), ({}, {"dtype": "bf16"}), ({"accept": ST}, {"dtype": "bf16"})],
    ids=["accept-parameter", "query", "both"],
)
def test_bf16_params_are_torchs_rounding_of_the_float32_params(client, headers, params) -> None:
    # Finite params (a session holds no inf), some of which BF16 cannot: they round to inf.
    special = np.array(
        [3.4028235e38, -3.4e38, 1e-40, -1e-45, 3.3e38, 1.00390625, 1.01171875, -0.0], np.float32
    )
    initial = {**_initial(), "special": special}
    sid = create(client, {"name": "sgd", "lr": 0.1}, initial)["id"]
    grads = {"w": np.full((8, 16), 0.3, np.float32), "b": np.full(16, -0.7, np.float32)}
    pushed = client.post(
        f"/v1/sessions/{sid}/gradients",
        content=st_body(grads),
        params=params,
        headers={"content-type": ST, **headers},
    )
    assert pushed.status_code == 200, pushed.text
    assert pushed.headers["content-type"] == ST
    float32, fields = st_parse(
        client.get(f"/v1/sessions/{sid}/params", headers={"accept": ST}).content
    )
    assert st_parse_fields(pushed) == {"version": 1, "applied": True, "lr": 0.1}
    fetched = client.get(f"/v1/sessions/{sid}/params", params=params, headers=headers)
    assert fetched.status_code == 200 and fetched.headers["etag"] == '"1"'
    assert fetched.headers["content-type"] == ST
    assert st_parse_fields(fetched) == fields == {"version": 1}
    for response in (pushed, fetched):
        got = _params_bits(response)
        assert sorted(got) == sorted(float32)
        for name, values in float32.items():
            want = torch_bits16(torch_tensor(values, torch.bfloat16))
            np.testing.assert_array_equal(got[name], want)
    assert _params_bits(fetched)["special"].tolist() == [
        0x7F80, 0xFF80, 0x0001, 0x8000, 0x7F78, 0x3F80, 0x3F82, 0x8000,
    ]  # fmt: skip


def st_parse_fields(response: httpx.Response) -> dict[str, Any]:
    header_len = int.from_bytes(response.content[:8], "little")
    metadata = orjson.loads(response.content[8 : 8 + header_len])["__metadata__"]
    return {k: orjson.loads(v) for k, v in metadata.items()}


def test_bf16_halves_the_bytes_on_the_wire(client) -> None:
    big = np.random.default_rng(2).standard_normal(500_000).astype(np.float32)
    sid = create(client, {"name": "sgd", "lr": 0.5}, {"big": big})["id"]
    url = f"/v1/sessions/{sid}/params"
    f32 = client.get(url, headers={"accept": ST})
    bf16 = client.get(url, headers={"accept": BF16_ST})
    assert len(f32.content) > 2_000_000
    assert len(bf16.content) <= len(f32.content) / 2 + 200  # the header is the only overhead
    assert int(bf16.headers["content-length"]) == len(bf16.content)
    grad = torch.from_numpy(np.random.default_rng(3).standard_normal(500_000).astype(np.float32))
    half_push = torch_save({"big": grad.bfloat16()})
    f32_push = st_body({"big": grad.numpy()})
    assert len(half_push) <= len(f32_push) / 2 + 200
    # A whole BF16 round trip: half the bytes each way.
    response = client.post(
        f"/v1/sessions/{sid}/gradients",
        content=half_push,
        params={"dtype": "bf16"},
        headers={"content-type": ST},
    )
    assert response.status_code == 200, response.text
    assert len(response.content) <= len(f32.content) / 2 + 200


def test_bf16_negotiation_errors_change_nothing(client) -> None:
    sid = create(client, ADAM, _initial())["id"]
    before = state(client, sid)
    body = st_body({"b": np.ones(16, np.float32)})
    url = f"/v1/sessions/{sid}/gradients"
    for accept in ("application/json", "application/json, application/problem+json"):
        response = client.post(
            url,
            content=body,
            params={"dtype": "bf16"},
            headers={"content-type": ST, "accept": accept},
        )
        assert "JSON carries float32" in assert_problem(response, 406, "not_acceptable")["detail"]
    response = client.post(
        url, content=body, headers={"content-type": ST, "accept": f"{ST}; dtype=f16"}
    )
    assert_problem(response, 406, "not_acceptable")
    response = client.post(url, content=body, params={"dtype": "f16"}, headers={"content-type": ST})
    assert_problem(response, 422, "invalid_request")
    assert state(client, sid) == before  # no 406 after the step: negotiation comes first
    params_url = f"/v1/sessions/{sid}/params"
    response = client.get(params_url, params={"dtype": "bf16"}, headers={"accept": JSON})
    assert_problem(response, 406, "not_acceptable")
    assert_problem(client.get(params_url, params={"dtype": "BF16"}), 422, "invalid_request")
    # JSON without a dtype is unchanged, and ?dtype=f32 with JSON is fine.
    assert client.get(params_url, params={"dtype": "f32"}).json()["version"] == 0


def test_state_export_stays_float32_whatever_is_asked(client) -> None:
    sid = create(client, ADAM, _initial())["id"]
    response = client.get(f"/v1/sessions/{sid}/state", headers={"accept": BF16_ST})
    assert response.status_code == 200, response.text
    header_len = int.from_bytes(response.content[:8], "little")
    header = orjson.loads(response.content[8 : 8 + header_len])
    assert {e["dtype"] for k, e in header.items() if k != "__metadata__"} == {"F32"}
    response = client.get(f"/v1/sessions/{sid}/state", params={"dtype": "bf16"})
    assert response.status_code == 200 and response.headers["content-type"] == JSON


def test_openapi_documents_the_dtype_query(client) -> None:
    spec = client.get("/openapi.json").json()
    for path, method in (
        ("/v1/sessions/{sid}/params", "get"),
        ("/v1/sessions/{sid}/gradients", "post"),
    ):
        parameters = {p["name"]: p for p in spec["paths"][path][method]["parameters"]}
        schema = parameters["dtype"]["schema"]
        assert {"f32", "bf16"} <= {v for s in schema["anyOf"] for v in s.get("enum", [])}
