"""Yamux whose frame writes are never cancelled half-way.

Found by the session-open flood (tests/test_abuse.py): py-libp2p's Noise writer spends a nonce
before its first checkpoint, so a write cancelled there sends nothing yet desynchronises the whole
connection, and the other side drops it at the next message ("Failed authentication of message")
with every stream on it. FramedStream shields its own frame writes, but yamux also writes from
places that get cancelled routinely: a window update sent from inside `read()` when a stream's
reader task is cancelled (every FramedStream close cancels its reader), an RST when a reset is cut
short, multistream negotiation under its timeout. With many streams opening and closing at once,
one of those hits a Noise write within minutes, and the connection dies.

So every yamux frame write (all of them go through `_write_frame`, under yamux's write lock) runs
shielded from cancellation, with its own deadline: a frame is written whole or the connection is
closed, never left half-encrypted. `create_host` installs this.
"""

from __future__ import annotations

import logging

import trio
from libp2p.stream_muxer.exceptions import MuxedConnUnavailable
from libp2p.stream_muxer.yamux.yamux import Yamux

logger = logging.getLogger(__name__)

# A frame is at most 64 KiB + 12 bytes; a healthy socket takes it in milliseconds, and a peer
# that has not read for this long is frozen (FramedStream's heartbeats say the same at 5 s).
FRAME_WRITE_TIMEOUT = 30.0
CLOSE_TIMEOUT = 1.0


async def _atomic_write_frame(self: Yamux, data: bytes) -> None:
    with trio.CancelScope(shield=True) as scope:
        scope.deadline = trio.current_time() + FRAME_WRITE_TIMEOUT
        await _original_write_frame(self, data)
    if scope.cancelled_caught:
        # Possibly half-written: the connection's encryption is broken for good. Close the
        # secured connection underneath (a yamux GO_AWAY would be one more write to it).
        logger.warning("yamux frame write to %s took over %.0f s; closing the connection",
                       self.peer_id, FRAME_WRITE_TIMEOUT)
        with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_TIMEOUT):
            try:
                await self.secured_conn.close()
            except Exception:
                logger.debug("closing a stuck connection failed", exc_info=True)
        raise MuxedConnUnavailable("frame write timed out; connection closed")


_original_write_frame = Yamux._write_frame


def install_atomic_yamux_writes() -> None:
    """Patch py-libp2p's Yamux class (0.8.1 builds it by name in MuxerMultistream, ignoring the
    class given in muxer_opt, so a subclass would never be used). Idempotent; process-wide."""
    if Yamux._write_frame is not _atomic_write_frame:
        Yamux._write_frame = _atomic_write_frame  # type: ignore[method-assign]
