"""Which codec hidden states take on one link: raw, zstd, or the opt-in lossy q8.

Compression pays only when the wire time it saves beats the CPU time it costs:

    zstd wins  iff  bytes saved / link rate  >  its extra encode + decode time over raw

Both sides of that come from measurements on real SmolLM2 hidden states (`MEASURED_ZSTD`,
from `scripts/bench_codec.py`): zstd saves ~7 % of fp32/fp16 bytes and ~20 % of bf16 bytes,
and costs a fixed ~27 us per tensor plus ~1.7 ns per byte. So it pays for a 128-token prefill
chunk below ~320 Mbit/s (fp32) to ~870 Mbit/s (bf16), and for one decode token only below
~8 (fp16), ~30 (fp32) or ~50 (bf16) Mbit/s.

The link rate is an estimate from the address the stream actually runs over (nobody measures
bandwidth on the hot path): loopback, private LAN, or the public internet. `compression` (the
client's choice, sent to every peer in the session's open request) overrides the estimate:
"raw" and "zstd" force a lossless codec, "q8" quantizes hidden states (lossy, ~3.8x smaller
than fp32; tokens measured in README). The receiver accepts every codec, so all of this is the
sender's business. Token ids and masks never go through here: they always travel raw.
"""

from __future__ import annotations

import ipaddress
import weakref
from dataclasses import dataclass
from typing import Any

import torch
import trio

from molink.dht.wire import Q8, BadCodec, encode_tensor

AUTO = "auto"
COMPRESSION_MODES = (AUTO, "raw", "zstd", Q8)
DEFAULT_COMPRESSION = AUTO


@dataclass(frozen=True)
class ZstdCost:
    """zstd level 1 on one dtype's hidden states, against raw encoding of the same tensor."""

    ratio: float  # zstd bytes = raw bytes / ratio + header_bytes
    header_bytes: float
    fixed_seconds: float  # extra encode + decode time per tensor, whatever its size
    seconds_per_byte: float  # extra encode + decode time per raw byte

    def break_even_rate(self, nbytes: int) -> float:
        """Bytes/s below which zstd pays for a tensor of `nbytes` raw bytes (0: never)."""
        saved_bytes = nbytes * (1 - 1 / self.ratio) - self.header_bytes
        return max(0.0, saved_bytes) / (self.fixed_seconds + nbytes * self.seconds_per_byte)

    def saves_time(self, nbytes: int, rate: float) -> bool:
        return rate < self.break_even_rate(nbytes)


# Fitted by scripts/bench_codec.py (its "fit" lines) on SmolLM2-135M hidden states after block 10
# (1 and 128 tokens), one thread of a shared 2-core x86 box. The time terms are zstd's own speed
# (~1 GB/s compress, ~1.35 GB/s decompress) and hardly depend on the dtype: one value, from a quiet
# run (27 us, 1.7 ns); runs beside other jobs gave 27-50 us and 1.8-2.4 ns, which moves each
# break-even rate by under a third and no choice at the rates in the bench's table.
ZSTD_FIXED_SECONDS = 27e-6
ZSTD_SECONDS_PER_BYTE = 1.7e-9
MEASURED_ZSTD: dict[torch.dtype, ZstdCost] = {
    torch.float32: ZstdCost(1.077, 48, ZSTD_FIXED_SECONDS, ZSTD_SECONDS_PER_BYTE),
    torch.float16: ZstdCost(1.073, 51, ZSTD_FIXED_SECONDS, ZSTD_SECONDS_PER_BYTE),
    torch.bfloat16: ZstdCost(1.258, 42, ZSTD_FIXED_SECONDS, ZSTD_SECONDS_PER_BYTE),  # 8 exponent bits squeeze
}

# Assumed rates, bytes per second, by where the other end is.
LINK_RATES = {
    "loopback": 1e9,  # plain TCP on loopback measured ~1 GB/s here (DESIGN.md §3)
    "lan": 125e6,  # private addresses: gigabit ethernet
    "wan": 12.5e6,  # public internet: 100 Mbit/s; every rate below ~300 Mbit/s makes the same
                    # choices for prefill chunks, so the guess need not be precise
}
# No address to go by (an unknown stream type): assume the internet. Wrongly compressing on a fast
# link costs ~1.7 ns/byte (~4 ms for a 1024-token fp32 SmolLM2 prefill hop); wrongly sending raw
# at 100 Mbit/s costs ~7 % of ~190 ms on that hop: guessing "slow" is the cheaper mistake.
UNKNOWN_LINK = "wan"
# zstd and q8 work at ~1 ns per byte: above this, encode in a worker thread so the event loop keeps
# serving other sessions' sockets (a 16 MB prefill chunk would otherwise stall them ~20-50 ms)
THREAD_ENCODE_BYTES = 1 << 20


def check_compression(mode: Any) -> str:
    if mode not in COMPRESSION_MODES:
        raise ValueError(f"unknown compression {mode!r}; known: {COMPRESSION_MODES}")
    return mode


def link_kind_of_ip(ip: str | None) -> str:
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return UNKNOWN_LINK
    if address.is_loopback:
        return "loopback"
    if address.is_private or address.is_link_local:
        return "lan"
    return "wan"


def remote_ip(stream: Any) -> str | None:
    """The other end's IP of a FramedStream over a direct channel (its TCP socket) or a libp2p
    stream (the connection's remote address; the relay's, for a relayed one)."""
    raw = getattr(stream, "stream", stream)
    try:
        sock = getattr(raw, "socket", None)
        if sock is not None:  # molink.dht.direct.DirectChannel: a trio SocketStream
            return sock.socket.getpeername()[0]
        address = raw.get_remote_address()
        return address[0] if address else None
    except Exception:  # closed socket, a stream type without addresses: no estimate
        return None


_rates: "weakref.WeakKeyDictionary[Any, float]" = weakref.WeakKeyDictionary()


def link_rate(stream: Any) -> float:
    """Assumed bytes/s to the other end of `stream`; looked up once per stream."""
    try:
        return _rates[stream]
    except (KeyError, TypeError):
        pass
    rate = LINK_RATES[link_kind_of_ip(remote_ip(stream))]
    try:
        _rates[stream] = rate
    except TypeError:  # not weak-referenceable: just don't cache
        pass
    return rate


def choose_codec(mode: str, dtype: torch.dtype, nbytes: int, rate: float) -> str:
    """The codec for one hidden-state tensor of `nbytes` raw bytes on a link of `rate` bytes/s."""
    if mode != AUTO:
        return mode
    cost = MEASURED_ZSTD.get(dtype)
    return "zstd" if cost is not None and cost.saves_time(nbytes, rate) else "raw"


def encode_hidden(tensor: torch.Tensor, mode: str, stream: Any) -> dict:
    """Hidden states for the wire to the other end of `stream`, with the codec `mode` calls for."""
    nbytes = tensor.numel() * tensor.element_size()
    codec = choose_codec(mode, tensor.dtype, nbytes, link_rate(stream) if mode == AUTO else 0.0)
    if codec == Q8:
        try:
            return encode_tensor(tensor, codec=Q8)
        except BadCodec:  # NaN/inf: send them as they are, the receiver reports what is wrong
            return encode_tensor(tensor, codec="raw")
    return encode_tensor(tensor, codec=codec)


async def encode_hidden_async(tensor: torch.Tensor, mode: str, stream: Any) -> dict:
    """encode_hidden, in a worker thread when the tensor is large and the codec is not raw."""
    if mode == "raw" or tensor.numel() * tensor.element_size() < THREAD_ENCODE_BYTES:
        return encode_hidden(tensor, mode, stream)
    return await trio.to_thread.run_sync(encode_hidden, tensor, mode, stream)
