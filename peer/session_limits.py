"""Caps on what one client, one connection and one session may take from a peer.

The KV-cache budget (memory_cache.py) already stops a peer from promising memory it lacks, and
idle sessions already time out; these caps close the rest of the ways a stranger could crowd
out everyone else (issue #10):

- sessions per client: one peer id may hold at most `max_sessions_per_client` sessions, so a
  single attacker cannot take all `max_sessions` slots;
- session opens in progress: a stream that has not finished opening (waiting for its `open`
  frame, or dialling the next hop, up to 10 s) costs a task and maybe an outgoing dial: at most
  `max_pending_opens_per_client` per client and `max_pending_opens` in all, the rest refused at once;
- tokens per session (`max_session_tokens`, batch x max_length): optional; off, a session may
  take the whole cache budget, as before;
- bytes per request: a stream may send only a small `open` frame until its session exists;
  then its frames and its receive queue are bounded by what the session can legitimately send
  (its batch x max_length hidden states), not by the 160 MB protocol maximum;
- session duration: `max_session_seconds` from open, however busy the session keeps itself.

Every refusal is an `error` frame: code `busy` (the client tries another replica, no ban) or
`session_expired`, with `limit` naming the cap that was hit.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from molink.dht.wire import WireLimits
from molink.peer import protocol as p
from molink.peer.session_limits_config import SessionLimits  # the caps, apart so the CLI parser needs no torch


class LimitExceeded(p.ProtocolError):
    """A cap was hit; `limit` names it (it travels in the error frame)."""

    def __init__(self, limit: str, message: str, code: str = p.BUSY):
        super().__init__(code, f"limit {limit}: {message}")
        self.limit = limit


# An `open` frame is ~1 KB (16 next-hop addresses of < 512 chars at most): nothing bigger may
# arrive before the session exists, and nothing may pile up behind it.
OPEN_WIRE_LIMITS = WireLimits(max_frame_bytes=64 * 1024, max_tensor_bytes=64 * 1024)
OPEN_MAX_QUEUED_BYTES = 256 * 1024
FRAME_SLACK_BYTES = 1 << 20  # msgpack envelope, step fields, a tap digest: far below this


def session_frame_bytes(batch_size: int, max_length: int, hidden_size: int) -> int:
    """The most one frame of a session can legitimately carry: all its tokens' hidden states at
    4 bytes (fp32, the widest dtype accepted) and their int64 mask, plus framing slack."""
    most = batch_size * max_length * (hidden_size * 4 + 8) + FRAME_SLACK_BYTES
    return min(most, p.PEER_WIRE_LIMITS.max_frame_bytes)


def raise_stream_limits(framed: Any, batch_size: int, max_length: int, hidden_size: int) -> None:
    """Once a session exists, let its stream carry what the session needs (and no more).

    FramedStream reads `limits` and `max_queued_bytes` per frame, so this applies to the next
    frame; clients send steps only after `opened`, which is sent after this.
    """
    frame_bytes = session_frame_bytes(batch_size, max_length, hidden_size)
    limits = p.PEER_WIRE_LIMITS
    framed.limits = WireLimits(max_frame_bytes=frame_bytes,
                               max_tensor_bytes=min(frame_bytes, limits.max_tensor_bytes),
                               max_ndim=limits.max_ndim, max_str_len=limits.max_str_len,
                               max_array_len=limits.max_array_len, max_map_len=limits.max_map_len)
    # Steps queued at once all count against the session's room: together they fit one frame's
    # bound; twice that leaves room for framing and a client that pipelines a little ahead.
    framed.max_queued_bytes = 2 * frame_bytes


def client_of(framed: Any) -> str | None:
    """The remote peer id of a framed stream: from libp2p's Noise-authenticated connection, or
    the peer a direct channel's ticket was issued to; None if unknown (then only global caps apply)."""
    stream = getattr(framed, "stream", None)
    conn = getattr(stream, "muxed_conn", None)
    peer_id = getattr(conn, "peer_id", None)
    if peer_id is not None:
        return str(peer_id)
    remote = getattr(stream, "remote_peer", None)
    return remote if isinstance(remote, str) else None


class OpenGate:
    """Counts session opens in progress, in all and per client; over a cap, refuses at once."""

    def __init__(self, limits: SessionLimits):
        self.limits = limits
        self.pending = 0
        self.per_client: Counter[str] = Counter()
        self.refused = 0

    @contextmanager
    def opening(self, client: str | None) -> Iterator[None]:
        if self.pending >= self.limits.max_pending_opens:
            self.refused += 1
            raise LimitExceeded("pending_opens", f"{self.pending} session opens already in progress on "
                                                 "this peer; try again or another replica")
        if client is not None and self.per_client[client] >= self.limits.max_pending_opens_per_client:
            self.refused += 1
            raise LimitExceeded("pending_opens_per_client",
                                f"you already have {self.per_client[client]} session opens in progress here "
                                f"(max {self.limits.max_pending_opens_per_client})")
        self.pending += 1
        if client is not None:
            self.per_client[client] += 1
        try:
            yield
        finally:
            self.pending -= 1
            if client is not None:
                self.per_client[client] -= 1
                if self.per_client[client] <= 0:
                    del self.per_client[client]
