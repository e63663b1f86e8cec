"""The wire format: exact round trips, and hostile bytes only ever give a typed WireError."""

import tracemalloc

import msgpack
import pytest
import torch
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from molink.dht.wire import (
    CODECS,
    DTYPE_NAMES_ON_WIRE,
    LENGTH_PREFIX,
    BadCodec,
    BadShape,
    CorruptTensorData,
    DisallowedDtype,
    Frame,
    FrameTooLarge,
    MalformedFrame,
    TensorTooLarge,
    WireError,
    WireLimits,
    decode_frame,
    decode_tensor,
    dtype_tables,
    encode_frame,
    encode_tensor,
    parse_frame_length,
)

SMALL = WireLimits(max_frame_bytes=64 * 1024, max_tensor_bytes=16 * 1024)
FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

shapes = st.lists(st.integers(0, 5), min_size=0, max_size=4)


def random_tensor(dtype: torch.dtype, shape: list[int], seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    if dtype is torch.bool:
        return torch.randint(0, 2, shape, generator=gen).bool()
    if dtype.is_floating_point:
        return (torch.randn(shape, generator=gen) * 100).to(dtype)
    info = torch.iinfo(dtype)
    return torch.randint(max(info.min, -1000), min(info.max, 1000), shape, generator=gen).to(dtype)


@FAST
@given(dtype=st.sampled_from(DTYPE_NAMES_ON_WIRE), shape=shapes, codec=st.sampled_from(CODECS),
       seed=st.integers(0, 2**31))
def test_tensor_round_trip_is_bit_exact(dtype, shape, codec, seed):
    tensor = random_tensor(dtype_tables().by_name[dtype], shape, seed)
    frame = Frame("step", seed, {"hidden": encode_tensor(tensor, codec=codec)})
    back = decode_frame(encode_frame(frame))
    decoded = decode_tensor(back.body["hidden"])
    assert decoded.dtype == tensor.dtype and decoded.shape == tensor.shape
    assert torch.equal(decoded, tensor)


def test_non_contiguous_and_nan_tensors_round_trip():
    tensor = torch.randn(4, 6).t()
    tensor[0, 0] = float("nan")
    decoded = decode_tensor(encode_tensor(tensor))
    assert torch.equal(decoded.view(torch.int32), tensor.contiguous().view(torch.int32))


@FAST
@given(kind=st.text(min_size=1, max_size=20), request_id=st.integers(0, 2**63 - 1),
       body=st.dictionaries(st.text(max_size=8), st.integers(-(2**63), 2**64 - 1) | st.text(max_size=8) | st.binary(max_size=16),
                            max_size=5))
def test_frame_round_trip(kind, request_id, body):
    frame = Frame(kind, request_id, body)
    assert decode_frame(encode_frame(frame)) == frame


def test_disallowed_dtype_is_refused_both_ways():
    with pytest.raises(DisallowedDtype):
        encode_tensor(torch.zeros(2, dtype=torch.complex64))
    with pytest.raises(DisallowedDtype):
        decode_tensor({"dtype": "object", "shape": [1], "codec": "raw", "data": b"x"})


def test_zip_bomb_is_refused_before_decompressing():
    bomb = zstandard.ZstdCompressor(level=19).compress(b"\0" * 200_000_000)
    assert len(bomb) < 100_000
    claimed_huge = {"dtype": "float32", "shape": [50_000_000], "codec": "zstd", "data": bomb}
    with pytest.raises(TensorTooLarge):
        decode_tensor(claimed_huge, SMALL)
    claimed_small = {"dtype": "float32", "shape": [16], "codec": "zstd", "data": bomb}
    tracemalloc.start()
    with pytest.raises(CorruptTensorData):
        decode_tensor(claimed_small, SMALL)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 1_000_000


def test_length_prefix_over_limit_is_refused_before_reading():
    with pytest.raises(FrameTooLarge):
        parse_frame_length(LENGTH_PREFIX.pack(SMALL.max_frame_bytes + 1), SMALL)
    with pytest.raises(FrameTooLarge):
        encode_frame(Frame("x", 0, {"d": b"\0" * SMALL.max_frame_bytes}), SMALL)


@pytest.mark.parametrize(
    "tensor, error",
    [
        ({"dtype": "float32", "shape": [2], "codec": "raw", "data": b"\0" * 7}, CorruptTensorData),
        ({"dtype": "float32", "shape": [-1], "codec": "raw", "data": b""}, BadShape),
        ({"dtype": "float32", "shape": [1] * 9, "codec": "raw", "data": b"\0" * 4}, BadShape),
        ({"dtype": "float32", "shape": [2.0], "codec": "raw", "data": b"\0" * 8}, BadShape),
        ({"dtype": "float32", "shape": [2], "codec": "lz4", "data": b"\0" * 8}, BadCodec),
        ({"dtype": "float32", "shape": [2], "codec": "zstd", "data": b"not zstd"}, CorruptTensorData),
        ({"dtype": "bool", "shape": [2], "codec": "raw", "data": b"\x00\x07"}, CorruptTensorData),
        ({"dtype": "float32", "shape": [2], "codec": "raw"}, WireError),
        ("a string", WireError),
    ],
)
def test_malformed_tensors_get_typed_errors(tensor, error):
    with pytest.raises(error):
        decode_tensor(tensor, SMALL)


@pytest.mark.parametrize(
    "payload",
    [
        msgpack.packb([1, 2, 3]),
        msgpack.packb({"t": "x", "id": -1, "b": {}}),
        msgpack.packb({"t": "", "id": 1, "b": {}}),
        msgpack.packb({"t": "x", "id": 1, "b": []}),
        msgpack.packb({"t": "x", "id": 1, "b": {}, "extra": 1}),
        msgpack.packb({"t": "x", "id": True, "b": {}}),
        msgpack.packb({1: "x"}),
        b"\xc1",
        b"",
    ],
)
def test_malformed_frames_get_typed_errors(payload):
    with pytest.raises(MalformedFrame):
        decode_frame(LENGTH_PREFIX.pack(len(payload)) + payload, SMALL)


def test_container_claiming_huge_length_is_refused():
    # array32 header claiming 2**31 elements in a 6-byte payload
    payload = b"\xdd\x80\x00\x00\x00\x01"
    with pytest.raises(MalformedFrame):
        decode_frame(LENGTH_PREFIX.pack(len(payload)) + payload, SMALL)


def _decode_everything(data: bytes) -> None:
    frame = decode_frame(data, SMALL)
    for value in frame.body.values():
        decode_tensor(value, SMALL)


@settings(max_examples=400, deadline=2000)
@given(data=st.binary(max_size=512))
def test_random_bytes_only_raise_wire_errors(data):
    with pytest.raises(WireError):
        _decode_everything(data)


VALID = encode_frame(Frame("step", 7, {"hidden": encode_tensor(torch.randn(3, 5)),
                                         "mask": encode_tensor(torch.ones(3, 5, dtype=torch.int64), "raw")}))


@settings(max_examples=400, deadline=2000)
@given(positions=st.lists(st.integers(0, len(VALID) - 1), min_size=1, max_size=8),
       values=st.lists(st.integers(0, 255), min_size=8, max_size=8),
       cut=st.integers(0, len(VALID)))
def test_mutated_frames_decode_or_raise_wire_errors(positions, values, cut):
    data = bytearray(VALID)
    for pos, val in zip(positions, values):
        data[pos] = val
    for candidate in (bytes(data), bytes(data[:cut])):
        try:
            _decode_everything(candidate)
        except WireError:
            pass
