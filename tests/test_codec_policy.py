"""The q8 codec (bounded error, hostile inputs refused with typed errors) and the per-link codec policy."""

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from molink.dht import codec_policy
from molink.dht.codec_policy import (
    COMPRESSION_MODES,
    LINK_RATES,
    MEASURED_ZSTD,
    check_compression,
    choose_codec,
    encode_hidden,
    encode_hidden_async,
    link_kind_of_ip,
    link_rate,
)
from molink.dht.quantization import Q8_BLOCK
from molink.dht.wire import (
    BadCodec,
    BadQuantizedTensor,
    Frame,
    TensorError,
    TensorTooLarge,
    WireError,
    WireLimits,
    decode_frame,
    decode_tensor,
    encode_frame,
    encode_tensor,
)
from molink.peer import protocol as p

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SMALL = WireLimits(max_frame_bytes=64 * 1024, max_tensor_bytes=16 * 1024)
FLOATS = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
ROUNDING = {torch.float32: 2**-24, torch.float16: 2**-11, torch.bfloat16: 2**-8}  # half an ulp, relative


def block_absmax(x: torch.Tensor, block: int = Q8_BLOCK) -> torch.Tensor:
    """Each element's block absmax, computed independently of the codec."""
    flat = x.reshape(-1).float()
    padded = torch.nn.functional.pad(flat, (0, (-flat.numel()) % block))
    return padded.view(-1, block).abs().amax(1).repeat_interleave(block)[:flat.numel()].view(x.shape)


# ---------------------------------------------------------------- q8 round trips


@FAST
@given(dtype=st.sampled_from(sorted(FLOATS)), shape=st.lists(st.integers(0, 200), min_size=0, max_size=3),
       scale=st.sampled_from([1e-6, 1.0, 300.0, 2000.0]), seed=st.integers(0, 2**31))
def test_q8_round_trip_is_within_half_a_step_per_block(dtype, shape, scale, seed):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=gen) * scale).to(FLOATS[dtype])
    if x.numel() > 3:
        x.view(-1)[3] = 20 * scale  # an outlier (fp16 max: 65504): it must only coarsen its own block
    back = decode_tensor(decode_frame(encode_frame(Frame("s", 1, {"h": encode_tensor(x, "q8")}))).body["h"])
    assert back.dtype == x.dtype and back.shape == x.shape
    # |error| <= half a quantization step of the block (absmax/254), plus rounding to the dtype
    info = torch.finfo(x.dtype)
    bound = block_absmax(x) / 254 * (1 + 1e-5) + back.float().abs() * ROUNDING[x.dtype] + info.tiny * info.eps
    assert bool(((back.float() - x.float()).abs() <= bound).all())


def test_q8_is_four_times_smaller_than_fp32_hidden_states():
    hidden = torch.randn(1, 16, 576)
    encoded = encode_tensor(hidden, "q8")
    assert len(encoded["data"]) == hidden.numel() and len(encoded["scales"]) == 4 * hidden.numel() // Q8_BLOCK
    assert hidden.numel() * 4 / (len(encoded["data"]) + len(encoded["scales"])) > 3.7


def test_q8_carries_floats_only_and_finite_values_only():
    for tensor in (torch.ones(4, dtype=torch.int64), torch.ones(4, dtype=torch.bool)):
        with pytest.raises(BadCodec):
            encode_tensor(tensor, "q8")
    with pytest.raises(BadCodec):
        encode_tensor(torch.tensor([1.0, math.inf]), "q8")
    # the sender's helper sends such a tensor raw instead: the receiver then says what is wrong
    nan = torch.tensor([[[1.0, math.nan]]])
    assert encode_hidden(nan, "q8", stream=None)["codec"] == "raw"


# ---------------------------------------------------------------- hostile q8 tensors


def q8(**overrides) -> dict:
    good = encode_tensor(torch.randn(2, 100), "q8")  # 200 values: 4 blocks, the last one partial
    return {**good, **overrides}


def scales_of(*values: float) -> bytes:
    return torch.tensor(values, dtype=torch.float32).numpy().tobytes()


@pytest.mark.parametrize("tensor, error", [
    (q8(block=0), BadQuantizedTensor),
    (q8(block=7), BadQuantizedTensor),
    (q8(block=1 << 20), BadQuantizedTensor),
    (q8(block="64"), BadQuantizedTensor),
    (q8(block=64.0), BadQuantizedTensor),
    (q8(block=True), BadQuantizedTensor),
    (q8(block=32), BadQuantizedTensor),  # 200 values in blocks of 32 need 7 scales, 4 came
    (q8(scales=b"\0" * 12), BadQuantizedTensor),  # 3 scales for 4 blocks
    (q8(scales=b"\0" * 17), BadQuantizedTensor),
    (q8(scales="not bytes"), BadQuantizedTensor),
    (q8(data=b"\0" * 199), BadQuantizedTensor),
    (q8(data=b"\0" * 201), BadQuantizedTensor),
    (q8(data=[1, 2]), TensorError),
    (q8(scales=scales_of(1, 1, math.nan, 1)), BadQuantizedTensor),
    (q8(scales=scales_of(1, math.inf, 1, 1)), BadQuantizedTensor),
    (q8(scales=scales_of(1, 1, 1, -1)), BadQuantizedTensor),
    (q8(dtype="float16", scales=scales_of(1, 1, 1, 1000)), BadQuantizedTensor),  # 127 x 1000 > fp16 max
    (q8(data=b"\x80" + b"\0" * 199), BadQuantizedTensor),  # -128: never produced
    (q8(dtype="int64"), BadCodec),
    (q8(dtype="bool"), BadCodec),
    (q8(dtype="complex64"), TensorError),
    (q8(shape=[2, 100, 1000]), TensorTooLarge),  # checked before anything is allocated
    (q8(shape=[-2, 100]), TensorError),
    ({k: v for k, v in q8().items() if k != "scales"}, TensorError),
    ({**q8(), "extra": 1}, TensorError),
    ({**encode_tensor(torch.randn(2, 100), "raw"), "block": 64}, TensorError),  # q8 keys on a raw tensor
])
def test_malformed_q8_tensors_get_typed_errors(tensor, error):
    with pytest.raises(error):
        decode_tensor(tensor, SMALL)


@settings(max_examples=300, deadline=2000)
@given(field=st.sampled_from(["dtype", "shape", "block", "scales", "data"]),
       value=st.one_of(st.none(), st.booleans(), st.integers(-2**40, 2**40), st.floats(allow_nan=True),
                       st.text(max_size=8), st.binary(max_size=64),
                       st.lists(st.integers(-5, 300), max_size=4)))
def test_q8_fields_replaced_by_anything_decode_or_raise_wire_errors(field, value):
    try:
        out = decode_tensor(q8(**{field: value}), SMALL)
    except WireError:
        return
    assert bool(torch.isfinite(out).all())  # whatever decodes is finite


# ---------------------------------------------------------------- the policy


MBIT = 1e6 / 8


@pytest.mark.parametrize("dtype, tokens, mbit, expected", [
    (torch.float32, 128, 10, "zstd"),
    (torch.float32, 128, 100, "zstd"),
    (torch.float32, 128, 1000, "raw"),
    (torch.float32, 128, 10000, "raw"),
    (torch.float32, 1, 10, "zstd"),  # a decode token: only on a very slow link
    (torch.float32, 1, 100, "raw"),
    (torch.float16, 1, 10, "raw"),
    (torch.bfloat16, 128, 500, "zstd"),  # bf16 compresses 1.26x: worth it up to ~870 Mbit/s
    (torch.bfloat16, 128, 1000, "raw"),
    (torch.int64, 128, 10, "raw"),  # no measurement for it: never compressed by guesswork
])
def test_auto_picks_zstd_only_where_it_saves_time(dtype, tokens, mbit, expected):
    nbytes = tokens * 576 * torch.empty((), dtype=dtype).element_size()
    assert choose_codec("auto", dtype, nbytes, mbit * MBIT) == expected


def test_forced_modes_and_validation():
    for mode in ("raw", "zstd", "q8"):
        assert choose_codec(mode, torch.float32, 10**6, 10 * MBIT) == mode
        assert choose_codec(mode, torch.float32, 10, 1e12) == mode
    assert [check_compression(mode) for mode in COMPRESSION_MODES] == list(COMPRESSION_MODES)
    for bad in ("lz4", "", None, 1, "Q8"):
        with pytest.raises(ValueError):
            check_compression(bad)


def test_break_even_follows_the_measured_costs():
    cost = MEASURED_ZSTD[torch.float32]
    nbytes = 128 * 576 * 4
    rate = cost.break_even_rate(nbytes)
    saved = nbytes * (1 - 1 / cost.ratio) - cost.header_bytes
    assert saved / rate == pytest.approx(cost.fixed_seconds + nbytes * cost.seconds_per_byte)
    assert cost.break_even_rate(8) == 0.0  # a tensor smaller than zstd's header never pays


@pytest.mark.parametrize("ip, kind", [
    ("127.0.0.1", "loopback"), ("127.8.9.10", "loopback"), ("::1", "loopback"),
    ("192.168.1.20", "lan"), ("10.77.0.3", "lan"), ("172.16.0.1", "lan"), ("fe80::1", "lan"), ("fd00::5", "lan"),
    ("8.8.8.8", "wan"), ("2001:4860::8888", "wan"),
    (None, codec_policy.UNKNOWN_LINK), ("not an ip", codec_policy.UNKNOWN_LINK),
])
def test_link_kind_from_the_remote_address(ip, kind):
    assert link_kind_of_ip(ip) == kind


class FakeSocket:
    def __init__(self, ip):
        self.ip = ip

    def getpeername(self):
        if self.ip is None:
            raise OSError("not connected")
        return (self.ip, 4242)


class FakeDirectChannel:  # molink.dht.direct.DirectChannel: .socket is a trio SocketStream
    def __init__(self, ip):
        self.socket = type("SocketStream", (), {"socket": FakeSocket(ip)})()


class FakeLibp2pStream:
    def __init__(self, address):
        self.address = address

    def get_remote_address(self):
        return self.address


class FakeFramed:
    def __init__(self, stream):
        self.stream = stream


def test_link_rate_of_direct_and_libp2p_streams():
    assert link_rate(FakeFramed(FakeDirectChannel("127.0.0.1"))) == LINK_RATES["loopback"]
    assert link_rate(FakeFramed(FakeDirectChannel("192.168.0.7"))) == LINK_RATES["lan"]
    assert link_rate(FakeFramed(FakeDirectChannel(None))) == LINK_RATES[codec_policy.UNKNOWN_LINK]
    assert link_rate(FakeFramed(FakeLibp2pStream(("93.184.216.34", 4001)))) == LINK_RATES["wan"]
    assert link_rate(FakeFramed(FakeLibp2pStream(None))) == LINK_RATES[codec_policy.UNKNOWN_LINK]
    assert link_rate(None) == LINK_RATES[codec_policy.UNKNOWN_LINK]


def test_encode_hidden_follows_the_link():
    prefill = torch.randn(1, 128, 576)
    assert encode_hidden(prefill, "auto", FakeFramed(FakeDirectChannel("127.0.0.1")))["codec"] == "raw"
    assert encode_hidden(prefill, "auto", FakeFramed(FakeDirectChannel("8.8.4.4")))["codec"] == "zstd"
    assert encode_hidden(prefill[:, :1], "auto", FakeFramed(FakeDirectChannel("8.8.4.4")))["codec"] == "raw"
    assert encode_hidden(prefill, "q8", FakeFramed(FakeDirectChannel("127.0.0.1")))["codec"] == "q8"
    assert encode_hidden(prefill, "raw", None)["codec"] == "raw"


async def test_large_tensors_are_encoded_off_the_event_loop_with_the_same_result():
    big = torch.randn(1, 512, 576)  # 1.2 MB: over THREAD_ENCODE_BYTES
    assert big.numel() * 4 >= codec_policy.THREAD_ENCODE_BYTES
    for mode in ("q8", "zstd", "raw"):
        threaded = await encode_hidden_async(big, mode, None)
        assert threaded == encode_hidden(big, mode, None)


# ---------------------------------------------------------------- the open request


def open_body(**overrides) -> dict:
    return {**p.OpenRequest(b"s" * 16, "key", 0, 3, 1, 8, None).to_body(), **overrides}


def test_open_request_carries_a_checked_compression():
    for mode in COMPRESSION_MODES:
        assert p.OpenRequest.from_body(open_body(compression=mode), 6).compression == mode
    legacy = open_body()
    del legacy["compression"]  # clients from before the field: "auto"
    assert p.OpenRequest.from_body(legacy, 6).compression == "auto"
    for bad in ("lz4", "", None, 8, b"q8", ["q8"]):
        with pytest.raises(p.ProtocolError) as refused:
            p.OpenRequest.from_body(open_body(compression=bad), 6)
        assert refused.value.code == p.BAD_REQUEST
