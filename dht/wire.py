"""The MoLink wire format, used by peers and clients alike.

A frame is a 4-byte big-endian length followed by a msgpack map {"t": type, "id": request id,
"b": body}. Tensors inside a body are maps {"dtype", "shape", "codec", "data"}. Everything read
off the network is checked before it is trusted: the frame length against `max_frame_bytes`
before the payload is read, msgpack container sizes by the unpacker, dtypes against an allow-list,
and a tensor's decoded size (shape x dtype) against `max_tensor_bytes` *before* any decompression,
so a zstd bomb never gets the chance to allocate. No pickle, no torch.load: tensors are raw bytes
reinterpreted with `torch.frombuffer`.

torch is imported on the first tensor, not with this module: a bootstrap node frames messages but
never carries a tensor, and starts in a second without torch's import (several under load).

Codecs: "raw" and "zstd" are lossless; "q8" (opt-in, lossy, floating-point tensors only) carries
int8 values plus one float32 scale per block of values (molink.dht.quantization) in two extra
keys, "block" and "scales", and decodes to the tensor's original dtype.
"""

from __future__ import annotations

import functools
import math
import struct
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import msgpack
import zstandard

LENGTH_PREFIX = struct.Struct(">I")
LENGTH_PREFIX_BYTES = LENGTH_PREFIX.size

# zstd level 1: on SmolLM2 hidden states (scripts/bench_codec.py) higher levels cost 2-5x the time
# for under 1 % more ratio, and the fast negative levels compress nothing (ratio 1.000); fp32
# activations are mostly mantissa noise that no level squeezes. When to compress at all: codec_policy.
DEFAULT_ZSTD_LEVEL = 1

CODECS = ("raw", "zstd")  # lossless: what the round trip tests hold to bit-exactness
Q8 = "q8"  # lossy 8-bit blockwise quantization, opt-in (see molink.dht.codec_policy)
ALL_CODECS = (*CODECS, Q8)
Q8_BLOCK_RANGE = (8, 4096)  # block sizes a decoder accepts; the encoder uses Q8_BLOCK

DTYPE_NAMES_ON_WIRE = ("float32", "float16", "bfloat16", "int64", "int32", "int8", "uint8", "bool")
QUANTIZABLE_DTYPE_NAMES = ("float32", "float16", "bfloat16")


class DtypeTables(NamedTuple):
    by_name: dict  # name on the wire -> torch dtype
    names: dict  # torch dtype -> name on the wire
    quantizable: tuple  # torch dtypes q8 carries


@functools.cache
def dtype_tables() -> DtypeTables:
    """Built on the first tensor (the import of torch with them)."""
    import torch

    by_name = {name: getattr(torch, name) for name in DTYPE_NAMES_ON_WIRE}
    return DtypeTables(by_name, {dtype: name for name, dtype in by_name.items()},
                       tuple(by_name[name] for name in QUANTIZABLE_DTYPE_NAMES))


TENSOR_KEYS = frozenset({"dtype", "shape", "codec", "data"})
Q8_TENSOR_KEYS = TENSOR_KEYS | {"block", "scales"}


class WireError(Exception):
    """Anything malformed, oversized or disallowed in bytes that came off the network."""


class FrameTooLarge(WireError):
    pass


class MalformedFrame(WireError):
    pass


class TensorError(WireError):
    pass


class DisallowedDtype(TensorError):
    pass


class TensorTooLarge(TensorError):
    pass


class BadShape(TensorError):
    pass


class BadCodec(TensorError):
    pass


class CorruptTensorData(TensorError):
    pass


class BadQuantizedTensor(CorruptTensorData):
    """A q8 tensor whose block size, scales or values are inconsistent or out of range."""


@dataclass(frozen=True)
class WireLimits:
    max_frame_bytes: int = 256 * 1024 * 1024
    max_tensor_bytes: int = 256 * 1024 * 1024
    max_ndim: int = 6
    max_str_len: int = 64 * 1024
    max_array_len: int = 64 * 1024
    max_map_len: int = 1024

    def __post_init__(self) -> None:
        if self.max_frame_bytes >= 2**32:
            raise ValueError("max_frame_bytes must fit the 4-byte length prefix")


DEFAULT_LIMITS = WireLimits()


@dataclass
class Frame:
    type: str
    request_id: int
    body: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------- frames


def encode_frame(frame: Frame, limits: WireLimits = DEFAULT_LIMITS) -> bytes:
    try:
        payload = msgpack.packb(
            {"t": frame.type, "id": frame.request_id, "b": frame.body}, use_bin_type=True
        )
    except (TypeError, ValueError, OverflowError) as exc:
        raise MalformedFrame(f"frame body cannot be encoded: {exc}") from exc
    if len(payload) > limits.max_frame_bytes:
        raise FrameTooLarge(f"frame of {len(payload)} bytes exceeds {limits.max_frame_bytes}")
    return LENGTH_PREFIX.pack(len(payload)) + payload


def parse_frame_length(prefix: bytes, limits: WireLimits = DEFAULT_LIMITS) -> int:
    if len(prefix) != LENGTH_PREFIX_BYTES:
        raise MalformedFrame(f"length prefix must be {LENGTH_PREFIX_BYTES} bytes")
    (length,) = LENGTH_PREFIX.unpack(prefix)
    if length > limits.max_frame_bytes:
        raise FrameTooLarge(f"peer announced a {length}-byte frame; limit {limits.max_frame_bytes}")
    return length


def unpack_msgpack(payload: bytes, limits: WireLimits = DEFAULT_LIMITS) -> Any:
    """msgpack with container limits, so a tiny payload cannot claim a huge allocation."""
    try:
        return msgpack.unpackb(
            payload,
            raw=False,
            strict_map_key=True,
            use_list=True,
            max_str_len=limits.max_str_len,
            max_bin_len=limits.max_frame_bytes,
            max_array_len=limits.max_array_len,
            max_map_len=limits.max_map_len,
            max_ext_len=0,
        )
    except (ValueError, TypeError, msgpack.exceptions.ExtraData, msgpack.exceptions.UnpackException) as exc:
        raise MalformedFrame(f"undecodable msgpack: {exc}") from exc
    except RecursionError as exc:
        raise MalformedFrame("msgpack nesting too deep") from exc


def decode_frame_payload(payload: bytes, limits: WireLimits = DEFAULT_LIMITS) -> Frame:
    if len(payload) > limits.max_frame_bytes:
        raise FrameTooLarge(f"frame of {len(payload)} bytes exceeds {limits.max_frame_bytes}")
    obj = unpack_msgpack(payload, limits)
    if not isinstance(obj, dict) or set(obj) != {"t", "id", "b"}:
        raise MalformedFrame("frame must be a map with exactly the keys t, id, b")
    kind, request_id, body = obj["t"], obj["id"], obj["b"]
    if not isinstance(kind, str) or not kind or len(kind) > 64:
        raise MalformedFrame("frame type must be a short non-empty string")
    if type(request_id) is not int or not 0 <= request_id < 2**63:
        raise MalformedFrame("request id must be a non-negative 63-bit integer")
    if not isinstance(body, dict):
        raise MalformedFrame("frame body must be a map")
    return Frame(kind, request_id, body)


def decode_frame(data: bytes, limits: WireLimits = DEFAULT_LIMITS) -> Frame:
    """Decode one whole frame (prefix + payload) held in memory."""
    length = parse_frame_length(data[:LENGTH_PREFIX_BYTES], limits)
    payload = data[LENGTH_PREFIX_BYTES:]
    if len(payload) != length:
        raise MalformedFrame(f"frame says {length} bytes but {len(payload)} follow")
    return decode_frame_payload(payload, limits)


# ---------------------------------------------------------------- tensors


def _raw_bytes(tensor: torch.Tensor) -> bytes:
    import torch

    tensor = tensor.detach().to("cpu").contiguous()
    if tensor.numel() == 0:
        return b""
    # Reinterpret as bytes: numpy has no bfloat16, a uint8 view works for every dtype.
    return tensor.reshape(-1).view(torch.uint8).numpy().tobytes()


def encode_tensor(
    tensor: torch.Tensor, codec: str = "zstd", level: int = DEFAULT_ZSTD_LEVEL
) -> dict[str, Any]:
    name = dtype_tables().names.get(tensor.dtype)
    if name is None:
        raise DisallowedDtype(f"dtype {tensor.dtype} is not allowed on the wire")
    if codec == Q8:
        return _encode_q8(tensor, name)
    data = _raw_bytes(tensor)
    if codec == "zstd":
        data = zstandard.ZstdCompressor(level=level).compress(data)
    elif codec != "raw":
        raise BadCodec(f"unknown codec {codec!r}; known: {ALL_CODECS}")
    return {"dtype": name, "shape": list(tensor.shape), "codec": codec, "data": data}


def _encode_q8(tensor: torch.Tensor, name: str) -> dict[str, Any]:
    import torch

    from molink.dht.quantization import Q8_BLOCK, quantize_blockwise

    if tensor.dtype not in dtype_tables().quantizable:
        raise BadCodec(f"q8 quantizes floating-point tensors only, not {tensor.dtype}")
    if not bool(torch.isfinite(tensor).all()):
        raise BadCodec("q8 cannot carry NaN or inf: send such a tensor raw")
    values, scales = quantize_blockwise(tensor, Q8_BLOCK)
    return {"dtype": name, "shape": list(tensor.shape), "codec": Q8, "block": Q8_BLOCK,
            "scales": _raw_bytes(scales), "data": _raw_bytes(values)}


def _checked_shape(shape: Any, limits: WireLimits) -> tuple[int, ...]:
    if not isinstance(shape, list) or len(shape) > limits.max_ndim:
        raise BadShape(f"shape must be a list of at most {limits.max_ndim} dims")
    if not all(type(d) is int and 0 <= d < 2**40 for d in shape):
        raise BadShape("shape dims must be non-negative integers")
    return tuple(shape)


def decoded_nbytes(dtype: torch.dtype, shape: tuple[int, ...]) -> int:
    return math.prod(shape) * dtype.itemsize


def _decompress_bounded(data: bytes, expected: int) -> bytes:
    """Decompress at most `expected` bytes; anything else is corruption, never an allocation."""
    try:
        reader = zstandard.ZstdDecompressor().stream_reader(data, read_across_frames=False)
        out = reader.read(expected + 1)
    except zstandard.ZstdError as exc:
        raise CorruptTensorData(f"zstd data is corrupt: {exc}") from exc
    if len(out) != expected:
        raise CorruptTensorData(f"zstd data decodes to {len(out)}+ bytes, expected {expected}")
    return out


def decode_tensor(obj: Any, limits: WireLimits = DEFAULT_LIMITS) -> torch.Tensor:
    if not isinstance(obj, dict) or set(obj) != (Q8_TENSOR_KEYS if obj.get("codec") == Q8 else TENSOR_KEYS):
        raise TensorError("tensor must be a map with keys dtype, shape, codec, data (q8: also block, scales)")
    import torch

    dtype = dtype_tables().by_name.get(obj["dtype"]) if isinstance(obj["dtype"], str) else None
    if dtype is None:
        raise DisallowedDtype(f"dtype {obj['dtype']!r} is not allowed; allowed: {sorted(DTYPE_NAMES_ON_WIRE)}")
    shape = _checked_shape(obj["shape"], limits)
    nbytes = decoded_nbytes(dtype, shape)
    if nbytes > limits.max_tensor_bytes:
        raise TensorTooLarge(f"tensor of {nbytes} bytes exceeds {limits.max_tensor_bytes}")
    data, codec = obj["data"], obj["codec"]
    if not isinstance(data, bytes):
        raise TensorError("tensor data must be bytes")
    if codec == Q8:
        return _decode_q8(obj, dtype, shape)
    if codec == "zstd":
        data = _decompress_bounded(data, nbytes)
    elif codec != "raw":
        raise BadCodec(f"unknown codec {codec!r}; known: {ALL_CODECS}")
    if len(data) != nbytes:
        raise CorruptTensorData(f"tensor data has {len(data)} bytes, shape x dtype says {nbytes}")
    if nbytes == 0:
        return torch.empty(shape, dtype=dtype)
    flat = torch.frombuffer(bytearray(data), dtype=torch.uint8).view(dtype)
    if dtype is torch.bool and bool((flat.view(torch.uint8) > 1).any()):
        raise CorruptTensorData("bool tensor holds bytes other than 0 and 1")
    return flat.reshape(shape)


def _decode_q8(obj: dict, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """A q8 tensor, every field checked before anything is allocated from it. The caller has
    checked the decoded size (shape x dtype) against the limit; the float32 working copy is at
    most 2x that (fp16/bf16) plus one block."""
    import torch

    from molink.dht.quantization import Q8_MAX_ABS, block_count, dequantize_blockwise

    if dtype not in dtype_tables().quantizable:
        raise BadCodec(f"q8 carries floating-point tensors only, not {dtype}")
    block, data, scale_bytes = obj["block"], obj["data"], obj["scales"]
    if type(block) is not int or not Q8_BLOCK_RANGE[0] <= block <= Q8_BLOCK_RANGE[1]:
        raise BadQuantizedTensor(f"q8 block size must be an integer in {list(Q8_BLOCK_RANGE)}")
    if not isinstance(scale_bytes, bytes):
        raise BadQuantizedTensor("q8 scales must be bytes")
    numel = math.prod(shape)
    if len(data) != numel:
        raise BadQuantizedTensor(f"q8 data has {len(data)} bytes, shape {list(shape)} needs {numel}")
    blocks = block_count(numel, block)
    if len(scale_bytes) != 4 * blocks:
        raise BadQuantizedTensor(f"q8 scales have {len(scale_bytes)} bytes, {blocks} blocks need {4 * blocks}")
    if numel == 0:
        return torch.empty(shape, dtype=dtype)
    scales = torch.frombuffer(bytearray(scale_bytes), dtype=torch.float32)
    # scale x 127 above the dtype's max would decode to inf: no encoder of finite values makes that
    if not bool((torch.isfinite(scales) & (scales >= 0) & (scales * Q8_MAX_ABS <= torch.finfo(dtype).max)).all()):
        raise BadQuantizedTensor(f"q8 scales must be finite, >= 0 and fit {dtype}")
    values = torch.frombuffer(bytearray(data), dtype=torch.int8)
    if bool((values < -Q8_MAX_ABS).any()):
        raise BadQuantizedTensor(f"q8 values must lie in [-{Q8_MAX_ABS}, {Q8_MAX_ABS}]")
    return dequantize_blockwise(values, scales, block).to(dtype).reshape(shape)
