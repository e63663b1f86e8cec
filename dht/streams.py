"""Length-prefixed MoLink frames over one libp2p stream, with deadlines, backpressure and liveness.

Why a reader task and a bounded queue: yamux resets a writer whose window stays shut for 5 s
(trap 3), so a busy consumer must never stop the socket from being read. The reader task drains
the stream into a bounded in-memory queue; when the queue bound is hit the stream fails with
ReceiveOverflow instead of silently stalling the sender.

Why an end-of-stream frame: a killed peer looks exactly like a clean close (EOF) to libp2p
(trap 4). `aclose()` sends an `eos` frame before its FIN, so the receiving side can tell
ClosedByPeer (said goodbye) from PeerVanished (EOF with no goodbye) and TruncatedFrame (EOF in
the middle of a frame).

Why heartbeats: a frozen (SIGSTOPped) peer keeps its TCP connection, so nothing ever fails. With
`heartbeat_interval` set we send `ping` frames; the peer's FramedStream answers `pong`
transparently; no bytes at all for `heartbeat_timeout` fails the stream with PeerUnresponsive.

Frame types "ping", "pong" and "eos" are reserved for this layer.
"""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import trio
from libp2p.abc import INetStream
from libp2p.network.stream.exceptions import StreamReset

from molink.dht.wire import (
    DEFAULT_LIMITS,
    LENGTH_PREFIX_BYTES,
    Frame,
    WireError,
    WireLimits,
    decode_frame_payload,
    encode_frame,
    parse_frame_length,
)

logger = logging.getLogger(__name__)

PING, PONG, EOS = "ping", "pong", "eos"
RESERVED_TYPES = frozenset({PING, PONG, EOS})

DEFAULT_RECEIVE_TIMEOUT = 30.0
DEFAULT_SEND_TIMEOUT = 30.0
# Time allowed from the first to the last byte of one frame (a 16 MB prefill chunk at 1 MB/s
# is 16 s); stops a peer that sends a length prefix and then trickles or stalls.
DEFAULT_FRAME_TIMEOUT = 60.0
DEFAULT_MAX_QUEUED_FRAMES = 256
DEFAULT_MAX_QUEUED_BYTES = 512 * 1024 * 1024
READ_CHUNK = 64 * 1024
# Close/reset/goodbye on a dead connection may block on the socket: bound it.
CLEANUP_TIMEOUT = 1.0


class FramedStreamError(Exception):
    """The framed stream failed; it cannot be used any more (except where noted)."""


class StreamTimeout(FramedStreamError, TimeoutError):
    pass


class ReceiveTimeout(StreamTimeout):
    """No frame within the receive deadline. The stream itself is still usable."""


class SendTimeout(StreamTimeout):
    """A frame could not be written in time; a partial frame was possibly sent, so the stream
    is failed (unless the deadline hit while still waiting for the send lock)."""


class PeerUnresponsive(StreamTimeout):
    """Heartbeat: nothing at all came from the peer for heartbeat_timeout seconds."""


class FrameTimeout(StreamTimeout):
    """A started frame did not finish arriving within frame_timeout."""


class StreamOpenError(FramedStreamError):
    """Opening the libp2p stream (dial + protocol negotiation) failed or timed out."""


class StreamOpenTimeout(StreamOpenError, StreamTimeout):
    """The peer did not even negotiate a stream in time (frozen, or gone without a word)."""


class StreamClosedError(FramedStreamError):
    """The stream is closed; the subclasses say how."""


class ClosedByPeer(StreamClosedError):
    """The peer said goodbye (eos frame): a clean end."""


class PeerVanished(StreamClosedError):
    """EOF at a frame boundary without a goodbye: the peer was killed, crashed, or is not
    speaking this framing."""


class TruncatedFrame(StreamClosedError):
    """EOF in the middle of a frame."""


class StreamResetError(StreamClosedError):
    """The stream was reset (by the peer, or by us after a failure)."""


class LocallyClosed(StreamClosedError):
    """We closed or aborted this stream ourselves."""


class ReceiveOverflow(FramedStreamError):
    """The consumer fell behind by more than the queue bound."""


class UnexpectedFrame(FramedStreamError):
    """request(): the reply did not carry the request id."""


# What a user of FramedStream needs to catch: our errors and malformed input from wire.py.
STREAM_ERRORS: tuple[type[Exception], ...] = (FramedStreamError, WireError)


class FramedStream:
    """MoLink frames over one libp2p stream. Start `run()` in a nursery (or use
    `open_framed_stream`) before `receive()`; `send()` works without it."""

    def __init__(
        self,
        stream: INetStream,
        *,
        limits: WireLimits = DEFAULT_LIMITS,
        receive_timeout: float = DEFAULT_RECEIVE_TIMEOUT,
        send_timeout: float = DEFAULT_SEND_TIMEOUT,
        frame_timeout: float = DEFAULT_FRAME_TIMEOUT,
        max_queued_frames: int = DEFAULT_MAX_QUEUED_FRAMES,
        max_queued_bytes: int = DEFAULT_MAX_QUEUED_BYTES,
        heartbeat_interval: float | None = None,
        heartbeat_timeout: float | None = None,
    ) -> None:
        if heartbeat_interval is not None and heartbeat_interval <= 0:
            raise ValueError("heartbeat_interval must be positive")
        self.stream = stream
        self.limits = limits
        self.receive_timeout = receive_timeout
        self.send_timeout = send_timeout
        self.frame_timeout = frame_timeout
        self.max_queued_bytes = max_queued_bytes
        self.heartbeat_interval = heartbeat_interval
        self.heartbeat_timeout = (
            heartbeat_timeout
            if heartbeat_timeout is not None
            else (3 * heartbeat_interval if heartbeat_interval else math.inf)
        )
        self.rtt: float | None = None  # last ping round trip, seconds
        self.last_received = trio.current_time()  # any byte from the peer counts
        self._frames_send, self._frames_recv = trio.open_memory_channel[tuple[Frame, int]](
            max_queued_frames
        )
        self._queued_bytes = 0
        self._rbuf = bytearray()  # bytes read past the current frame
        # Pongs are queued for a separate task: the reader must never block on a write.
        self._ctrl_send, self._ctrl_recv = trio.open_memory_channel[Frame](8)
        self._send_lock = trio.Lock()
        self._run_scope = trio.CancelScope()
        self._started = False
        self._closed = False
        self._write_closed = False
        self._error: Exception | None = None
        self._next_id = 0
        self._ping_id = 0
        self._ping_sent_at = 0.0

    # ------------------------------------------------------------------ public API

    @property
    def error(self) -> Exception | None:
        """Why the stream failed or ended, or None while it is healthy."""
        return self._error

    def next_request_id(self) -> int:
        self._next_id += 1
        return self._next_id

    async def send(self, frame: Frame, *, timeout: float | None = None) -> None:
        if frame.type in RESERVED_TYPES:
            raise ValueError(f"frame type {frame.type!r} is reserved for the stream layer")
        # Encoding errors (FrameTooLarge) are raised before anything is written: stream intact.
        await self._write(encode_frame(frame, self.limits), timeout)

    async def receive(self, *, timeout: float | None = None) -> Frame:
        """The next frame. Frames that arrived before a failure are delivered first; then the
        failure is raised (ClosedByPeer after a clean goodbye)."""
        deadline = self.receive_timeout if timeout is None else timeout
        with trio.move_on_after(deadline):
            try:
                frame, nbytes = await self._frames_recv.receive()
            except (trio.EndOfChannel, trio.ClosedResourceError):
                raise self._failure() from None
            self._queued_bytes -= nbytes
            return frame
        raise ReceiveTimeout(f"no frame within {deadline} s")

    async def request(self, frame: Frame, *, timeout: float | None = None) -> Frame:
        """Send `frame` and return the next frame, which must carry the same request id.
        For one outstanding request at a time on this stream."""
        await self.send(frame, timeout=timeout)
        reply = await self.receive(timeout=timeout)
        if reply.request_id != frame.request_id:
            error = UnexpectedFrame(
                f"reply {reply.type!r} has id {reply.request_id}, expected {frame.request_id}"
            )
            await self._abort(error)
            raise error
        return reply

    async def aclose(self) -> None:
        """Say goodbye (eos frame + FIN) and stop the reader. Idempotent."""
        if self._closed:
            return
        self._closed = True
        clean = False
        with trio.CancelScope(shield=True) as scope:
            scope.deadline = trio.current_time() + CLEANUP_TIMEOUT
            try:
                # Under the send lock, so a pong cannot be half-written or follow our FIN.
                async with self._send_lock:
                    if self._error is None:
                        await self.stream.write(encode_frame(Frame(EOS, 0, {}), self.limits))
                    if self._error is None or isinstance(self._error, (ClosedByPeer, PeerVanished)):
                        self._write_closed = True
                        await self.stream.close()  # yamux: FIN, a write half-close
                clean = True
            except Exception:
                logger.debug("goodbye failed", exc_info=True)
        # A failed or timed-out goodbye leaves the peer guessing: reset so it knows.
        await self._abort(LocallyClosed("stream closed locally"), reset=not clean)

    async def abort(self) -> None:
        """Reset the stream at once (no goodbye): for error paths."""
        self._closed = True
        await self._abort(LocallyClosed("stream aborted locally"))

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Reader (+ pong sender, + heartbeat) until the stream ends. Never raises except
        trio.Cancelled, so it cannot take the caller's nursery down: failures are recorded
        and raised by receive()/send()."""
        if self._started:
            raise RuntimeError("FramedStream.run() already started")
        self._started = True
        try:
            with self._run_scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._control_loop)
                    if self.heartbeat_interval is not None:
                        nursery.start_soon(self._heartbeat_loop)
                    task_status.started()
                    await self._read_loop()
                    nursery.cancel_scope.cancel()
        finally:
            self._frames_send.close()  # wake receivers; queued frames are still delivered

    # ------------------------------------------------------------------ failure handling

    def _failure(self) -> Exception:
        error = self._error or LocallyClosed("stream is not running")
        return error.with_traceback(None)  # raised repeatedly: don't grow its traceback

    async def _abort(self, error: Exception, *, reset: bool = True) -> None:
        """Record the first failure, stop the background tasks, reset the stream if asked."""
        if self._error is not None:
            return
        self._error = error
        if not isinstance(error, (ClosedByPeer, LocallyClosed)):
            logger.debug("framed stream failed: %r", error)
        self._frames_send.close()
        self._run_scope.cancel()
        if reset:
            with trio.CancelScope(shield=True) as scope:
                scope.deadline = trio.current_time() + CLEANUP_TIMEOUT
                try:
                    await self.stream.reset()
                except Exception:
                    logger.debug("stream reset failed", exc_info=True)

    # ------------------------------------------------------------------ writing

    async def _write(self, data: bytes, timeout: float | None) -> None:
        if self._error is not None:
            raise self._failure()
        deadline = self.send_timeout if timeout is None else timeout
        started = finished = False
        try:
            with trio.move_on_after(deadline):
                async with self._send_lock:
                    if self._error is not None:
                        raise self._failure()
                    if self._write_closed:
                        raise LocallyClosed("stream already closed for sending")
                    started = True
                    # Shielded: py-libp2p's Noise writer spends a nonce before its first
                    # checkpoint, so a write cancelled there sends nothing yet desynchronises
                    # the whole connection (every later message fails authentication). Only
                    # our own deadline may stop it, and then the connection is closed below.
                    with trio.CancelScope(shield=True) as write_scope:
                        write_scope.deadline = trio.current_time() + deadline
                        await self.stream.write(data)
                        finished = True
                    if write_scope.cancelled_caught:
                        await self._close_connection()
        except STREAM_ERRORS:
            raise
        except StreamReset as exc:
            await self._abort(StreamResetError(f"stream reset while sending: {exc}"), reset=False)
            raise self._failure() from exc
        except Exception as exc:  # StreamClosed, StreamError, whatever the muxer raises
            await self._abort(StreamClosedError(f"send failed: {exc!r}"))
            raise self._failure() from exc
        finally:
            if started and not finished and self._error is None:
                # Timed out or cancelled mid-frame: the framing is broken for good.
                await self._abort(SendTimeout(f"frame not written within {deadline} s"))
        if not finished:
            if started:
                raise self._failure()
            raise SendTimeout(f"send lock not acquired within {deadline} s")

    async def _close_connection(self) -> None:
        """A write stopped half-way may have broken the connection's encryption: drop it."""
        conn = getattr(self.stream, "muxed_conn", None)
        with trio.CancelScope(shield=True) as scope:
            scope.deadline = trio.current_time() + CLEANUP_TIMEOUT
            try:
                if conn is not None:
                    await conn.close()
            except Exception:
                logger.debug("closing a connection after a stopped write failed", exc_info=True)

    async def _control_loop(self) -> None:
        timeout = min(self.send_timeout, self.heartbeat_timeout)
        async for frame in self._ctrl_recv:
            try:
                await self._write(encode_frame(frame, self.limits), timeout)
            except STREAM_ERRORS:
                return  # already recorded by _write

    async def _heartbeat_loop(self) -> None:
        assert self.heartbeat_interval is not None
        while True:
            await trio.sleep(self.heartbeat_interval)
            silent = trio.current_time() - self.last_received
            if silent > self.heartbeat_timeout:
                await self._abort(PeerUnresponsive(f"nothing from the peer for {silent:.1f} s"))
                return
            self._ping_id += 1
            self._ping_sent_at = trio.current_time()
            try:
                self._ctrl_send.send_nowait(Frame(PING, self._ping_id, {}))
            except trio.WouldBlock:
                pass  # pongs already queued; the write deadline there catches a stuck peer

    # ------------------------------------------------------------------ reading

    async def _read_exact(self, n: int, *, at_boundary: bool) -> bytes | None:
        """Exactly n bytes (libp2p's read(n) may return fewer). None: clean EOF at a boundary.

        Reads ask for at least READ_CHUNK bytes and keep the surplus: one yamux read per small
        frame instead of two (each read also runs yamux's window bookkeeping).
        """
        buf = self._rbuf
        while len(buf) < n:
            try:
                chunk = await self.stream.read(max(n - len(buf), READ_CHUNK))
            except EOFError:  # StreamEOF, MuxedStreamEOF
                chunk = b""
            if not chunk:
                if at_boundary and not buf:
                    return None
                raise TruncatedFrame(f"EOF after {len(buf)} of {n} bytes")
            self.last_received = trio.current_time()
            if not buf and len(chunk) == n:
                return chunk  # the common large-frame case: no copy
            buf += chunk
        data = bytes(buf[:n])
        del buf[:n]
        return data

    async def _read_frame(self) -> tuple[Frame, int] | None:
        prefix = await self._read_exact(LENGTH_PREFIX_BYTES, at_boundary=True)
        if prefix is None:
            return None
        length = parse_frame_length(prefix, self.limits)  # FrameTooLarge before any allocation
        with trio.fail_after(self.frame_timeout):
            payload = await self._read_exact(length, at_boundary=False)
        assert payload is not None
        return decode_frame_payload(payload, self.limits), length

    async def _read_loop(self) -> None:
        try:
            while True:
                try:
                    item = await self._read_frame()
                except trio.TooSlowError:
                    raise FrameTimeout(f"frame not complete within {self.frame_timeout} s")
                if item is None:
                    raise PeerVanished("EOF without a goodbye frame (peer killed or crashed?)")
                frame, nbytes = item
                if frame.type == PING:
                    try:
                        self._ctrl_send.send_nowait(Frame(PONG, frame.request_id, {}))
                    except trio.WouldBlock:
                        pass  # a peer pinging faster than we answer gets fewer pongs
                elif frame.type == PONG:
                    if frame.request_id == self._ping_id:
                        self.rtt = trio.current_time() - self._ping_sent_at
                elif frame.type == EOS:
                    raise ClosedByPeer("peer closed the stream")
                else:
                    self._queued_bytes += nbytes
                    if self._queued_bytes > self.max_queued_bytes:
                        raise ReceiveOverflow(
                            f"consumer is {self._queued_bytes} bytes behind "
                            f"(limit {self.max_queued_bytes})"
                        )
                    try:
                        self._frames_send.send_nowait((frame, nbytes))
                    except trio.WouldBlock:
                        raise ReceiveOverflow(
                            f"consumer is more than {self._frames_send.statistics().max_buffer_size} "
                            "frames behind"
                        ) from None
        except (ClosedByPeer, PeerVanished) as exc:
            await self._abort(exc, reset=False)
        except StreamReset as exc:
            await self._abort(StreamResetError(f"stream reset by peer: {exc}"), reset=False)
        except STREAM_ERRORS as exc:
            await self._abort(exc)
        except Exception as exc:  # libp2p StreamError and whatever else a muxer raises
            await self._abort(FramedStreamError(f"read failed: {exc!r}"))


# ---------------------------------------------------------------------- helpers


@asynccontextmanager
async def open_framed_stream(stream: INetStream, **options: Any) -> AsyncIterator[FramedStream]:
    """A running FramedStream; a clean exit says goodbye, an exception exit resets the stream."""
    framed = FramedStream(stream, **options)
    async with trio.open_nursery() as nursery:
        await nursery.start(framed.run)
        try:
            yield framed
        except BaseException:
            await framed.abort()
            raise
        else:
            await framed.aclose()


async def open_raw_stream(host: Any, peer_id: Any, protocol_ids: str | Sequence[str], *,
                          open_timeout: float = 10.0) -> INetStream:
    """A libp2p stream to an already connected (or dialable) peer, not yet framed."""
    if isinstance(protocol_ids, str):
        protocol_ids = [protocol_ids]
    try:
        with trio.fail_after(open_timeout):
            return await host.new_stream(peer_id, list(protocol_ids))
    except trio.TooSlowError:
        raise StreamOpenTimeout(f"opening {protocol_ids} to {peer_id} took over {open_timeout} s")
    except Exception as exc:  # StreamFailure, SwarmException, ...
        # libp2p's message is generic; the reason ("protocol not supported") is in its cause.
        reason = f"{exc}" + (f" ({exc.__cause__})" if exc.__cause__ else "")
        raise StreamOpenError(f"could not open {protocol_ids} to {peer_id}: {reason}") from exc


@asynccontextmanager
async def dial_framed(
    host: Any,
    peer_id: Any,
    protocol_ids: str | Sequence[str],
    *,
    open_timeout: float = 10.0,
    **options: Any,
) -> AsyncIterator[FramedStream]:
    """Open a libp2p stream to an already connected (or dialable) peer and frame it."""
    raw = await open_raw_stream(host, peer_id, protocol_ids, open_timeout=open_timeout)
    async with open_framed_stream(raw, **options) as framed:
        yield framed


def framed_handler(
    handler: Callable[[FramedStream], Awaitable[None]], **options: Any
) -> Callable[[INetStream], Awaitable[None]]:
    """Adapt `async def handler(framed)` into a libp2p stream handler (for set_protocol_handler)."""

    async def stream_handler(stream: INetStream) -> None:
        async with open_framed_stream(stream, **options) as framed:
            await handler(framed)

    stream_handler.__name__ = getattr(handler, "__name__", "framed_handler")
    return stream_handler
