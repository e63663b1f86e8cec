"""The peer's stream handlers: client sessions, pushes from the previous hop (push_handler.py), and info.

A session lives as long as its client stream: the handler task that reads that stream owns the
session (its KV cache reservation and its push stream to the next hop) and frees it however the
stream ends. Steps are computed in a worker thread (`trio.to_thread`) so the event loop keeps
reading every socket while torch works; one compute at a time per peer (CapacityLimiter) keeps
CPU threads from fighting. Results go to the next hop (push) or back to the client (last hop or
relay mode). Any error in a step is answered with an `error` frame on the client's stream for
that session; nothing in one session can affect another.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from functools import partial

import trio
from libp2p.peer.id import ID

from molink.dht.direct import framed_data_stream, is_long_path, open_data_stream
from molink.dht.host import ConnectError, connect_peer, with_peer_id
from molink.dht.streams import STREAM_ERRORS, ClosedByPeer, FramedStream, ReceiveTimeout, StreamOpenTimeout
from molink.dht.codec_policy import encode_hidden_async
from molink.dht.wire import Frame, encode_tensor
from molink.peer import protocol as p
from molink.peer.batched_span import StepWork
from molink.peer.cost_curve import ForwardCost, PrefillCost, timed
from molink.peer.faults import Faults
from molink.peer.push_channels import PushChannels
from molink.peer.push_handler import serve_pushes
from molink.peer.memory_cache import ActiveSession, CacheBudgetExceeded, SessionRegistry
from molink.peer.session_limits import LimitExceeded, OpenGate, SessionLimits, client_of, raise_stream_limits
from molink.peer.scheduler import INLINE_COMPUTE_SECONDS, BatchingConfig, StepScheduler
from molink.peer.span import SpanModel
from molink.peer.step_bundles import Outgoing, run_bundle, send_tap, stackable

logger = logging.getLogger(__name__)

OPEN_TIMEOUT = 10.0
NEXT_HOP_CONNECT_TIMEOUT = 5.0
REUSE_TIMEOUT = 30.0  # a client stream whose session closed cleanly waits this long for the next open
MAX_IDLE_STREAMS_PER_CLIENT = 16  # such waiting streams per client; more are closed at once


@dataclass
class PeerStats:
    steps: int = 0
    tokens: int = 0
    sessions_opened: int = 0
    errors: int = 0


class InferenceHandler:
    def __init__(self, span: SpanModel, model_key: str, registry: SessionRegistry, host,
                 idle_timeout: float = 300.0, throughput: float = 0.0, batching: BatchingConfig | None = None,
                 faults: Faults | None = None, limits: SessionLimits | None = None,
                 prefill_cost: PrefillCost | None = None):
        self.span = span
        self.throughput = throughput  # block-steps per second, measured at start
        self.model_key = model_key
        self.registry = registry
        self.host = host
        self.idle_timeout = idle_timeout
        self.compute_limiter = trio.CapacityLimiter(1)
        self.stats = PeerStats()
        self.leaving = False
        self.limits = limits or SessionLimits()  # the registry enforces its session caps itself
        self.open_gate = OpenGate(self.limits)
        self.faults = faults if faults is not None else Faults.from_env()  # tests only: faults.py
        # continuous batching + decode first (scheduler.py); None: every step alone, as they come
        self.prefill_cost = prefill_cost or PrefillCost()  # what a prompt chunk costs here: announced
        self.scheduler = (StepScheduler(batching, throughput, self.prefill_cost)
                          if batching and batching.enabled else None)
        self.forward_cost = ForwardCost(throughput)  # steps computed here when batching is off
        # one shared channel per next-hop peer across a WAN (push_channels.py)
        self.push_channels = PushChannels(self._dial_next_hop, share=lambda hop: is_long_path(hop.addrs))
        self._idle_streams: dict[str, int] = {}  # client -> its streams waiting for a next session here

    async def run_workers(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """The handler's background work (nursery.start it before serving): the step scheduler's
        worker when batching is on, and the shared push channels (push_channels.py)."""
        async with trio.open_nursery() as nursery:
            await nursery.start(self.push_channels.run)
            if self.scheduler is not None:
                await nursery.start(self.scheduler.run)
            task_status.started()

    # ------------------------------------------------------------------ client sessions

    async def handle_inference(self, framed: FramedStream) -> None:
        """Sessions on one client stream, one after another: a client keeps the stream of a session
        that closed cleanly for its next session to this peer (swarm/channel_pool.py)."""
        client = client_of(framed)
        first: Frame | None = None  # the next session's open, read while the stream waited for it
        while True:
            async with AsyncExitStack() as stack:
                try:
                    with self.open_gate.opening(client):  # refused at once when too many opens are under way
                        session = await self._accept_session(framed, stack, client, first)
                except LimitExceeded as exc:
                    await self._send_error(framed, 0, exc.code, str(exc), limit=exc.limit)
                    return
                if session is None:
                    return
                try:
                    closed_cleanly = await self._serve_session(framed, session)
                finally:
                    self.registry.remove(session.session_id)
            first = await self._await_next_open(framed, client) if closed_cleanly else None
            if first is None:
                return

    async def _await_next_open(self, framed: FramedStream, client: str | None) -> Frame | None:
        """The first frame of the client's next session on this stream, or None (it left, took too
        long, or already keeps MAX_IDLE_STREAMS_PER_CLIENT streams waiting here)."""
        key = client or "?"
        if self._idle_streams.get(key, 0) >= MAX_IDLE_STREAMS_PER_CLIENT:
            return None
        self._idle_streams[key] = self._idle_streams.get(key, 0) + 1
        try:
            return await framed.receive(timeout=REUSE_TIMEOUT)
        except STREAM_ERRORS:
            return None
        finally:
            self._idle_streams[key] -= 1
            if not self._idle_streams[key]:
                del self._idle_streams[key]

    async def _accept_session(self, framed: FramedStream, stack: AsyncExitStack, client: str | None,
                              first: Frame | None = None) -> ActiveSession | None:
        if first is None:
            try:
                first = await framed.receive(timeout=OPEN_TIMEOUT)
            except STREAM_ERRORS:
                return None
        if first.type != p.OPEN:
            await self._send_error(framed, first.request_id, p.BAD_REQUEST, f"expected open, got {first.type!r}")
            return None
        return await self._open_session(framed, first, stack, client)

    async def _open_session(self, framed: FramedStream, frame: Frame, stack: AsyncExitStack,
                            client: str | None = None) -> ActiveSession | None:
        try:
            span = self.span  # the span now; a rebalance may replace self.span while this session runs
            request = p.OpenRequest.from_body(frame.body, span.config.num_hidden_layers)
            if request.model_key != self.model_key:
                raise p.ProtocolError(p.WRONG_MODEL, "this peer serves another model (or other weights)")
            if not span.start <= request.start < request.end <= span.end:
                raise p.ProtocolError(p.WRONG_MODEL, f"this peer serves blocks [{span.start}, {span.end})")
            if self.leaving:
                raise p.ProtocolError(p.BUSY, "peer is leaving the swarm")
            session = ActiveSession(
                session_id=request.session_id,
                span_session=span.new_session(request.start, request.end, request.max_length), span=span,
                batch_size=request.batch_size, max_length=request.max_length,
                reserved_tokens=request.batch_size * request.max_length,
                client_stream=framed, next_hop=request.next, tap=request.tap, compression=request.compression,
                client=client)
            try:
                self.registry.add(session)
            except CacheBudgetExceeded as exc:
                raise LimitExceeded(exc.limit, str(exc)) from exc
            except ValueError as exc:
                raise p.ProtocolError(p.BAD_REQUEST, str(exc)) from exc
            stack.callback(self.registry.remove, session.session_id)
            if request.next is not None:
                session.push_stream = await stack.enter_async_context(self.push_channels.use(request.next))
            # frames up to what this session can use, from now on (session_limits.py)
            raise_stream_limits(framed, request.batch_size, request.max_length, span.config.hidden_size)
        except p.ProtocolError as exc:
            await self._send_error(framed, frame.request_id, exc.code, str(exc), limit=getattr(exc, "limit", None))
            return None
        self.stats.sessions_opened += 1
        try:
            await framed.send(Frame(p.OPENED, frame.request_id, {"start": request.start, "end": request.end}))
        except STREAM_ERRORS as exc:  # the client gave up on this route meanwhile: routine in failover
            logger.info("session %s: client left before it opened: %s", request.session_id.hex()[:8], exc)
            return None
        return session

    @asynccontextmanager
    async def _dial_next_hop(self, next_hop: p.NextHop) -> AsyncIterator[FramedStream]:
        """A push channel to the next hop (PushChannels shares it between sessions)."""
        stream = await self._reach_next_hop(next_hop)
        async with framed_data_stream(stream, limits=p.PEER_WIRE_LIMITS) as framed:
            yield framed

    async def _reach_next_hop(self, next_hop: p.NextHop):
        try:
            peer_id = ID.from_base58(next_hop.peer_id)
            addrs = with_peer_id(next_hop.addrs, next_hop.peer_id)
        except Exception as exc:
            raise p.ProtocolError(p.BAD_REQUEST, f"bad next hop {next_hop.peer_id}: {exc}") from exc
        for reconnect in (False, True):
            # Twice: a connection both sides opened at the same moment can be torn down under the
            # first stream (seen as "handshake read failed"); a fresh one then works.
            try:
                await connect_peer(self.host, addrs, timeout=NEXT_HOP_CONNECT_TIMEOUT, reconnect=reconnect)
                return await open_data_stream(self.host, peer_id, next_hop.addrs, p.PUSH_PROTOCOL)
            except Exception as exc:  # any failure to reach the next hop is the client's to route around
                failure = exc
                if isinstance(exc, (ConnectError, StreamOpenTimeout)):
                    break  # unreachable or frozen: a second try would only double the wait
                logger.info("next hop %s: %s%s", next_hop.peer_id, exc, "" if reconnect else "; reconnecting")
        raise p.ProtocolError(p.NEXT_HOP_UNREACHABLE, f"cannot reach next hop {next_hop.peer_id}: {failure}")

    async def _serve_session(self, framed: FramedStream, session: ActiveSession) -> bool:
        """Serve until the session ends; True when the client closed it (the stream may carry another)."""
        while True:
            idle_left = self.idle_timeout - (time.monotonic() - session.last_used)
            if idle_left <= 0:
                await self._send_error(framed, 0, p.SESSION_EXPIRED, f"session idle for {self.idle_timeout:.0f} s")
                return False
            age_left = self.limits.max_session_seconds - (time.monotonic() - session.opened_at)
            if age_left <= 0:
                await self._send_error(framed, 0, p.SESSION_EXPIRED, "session reached this peer's maximum "
                                       f"duration of {self.limits.max_session_seconds:.0f} s", limit="session_seconds")
                return False
            try:
                frame = await framed.receive(timeout=min(idle_left, age_left))
            except ReceiveTimeout:
                continue  # re-check: pushes may have kept the session busy meanwhile
            except STREAM_ERRORS as exc:
                if not isinstance(exc, ClosedByPeer):
                    logger.info("session %s: client stream ended: %s", session.session_id.hex()[:8], exc)
                return False
            if frame.type == p.STEP:
                await self._step(session, frame, relay=bool(frame.body.get("relay", False)))
            elif frame.type == p.STEPS:  # this client's decode steps of several sessions (step_bundles.py)
                await run_bundle(self, frame, session.client)
            elif frame.type == p.CLOSE:
                try:
                    await framed.send(Frame(p.CLOSED, frame.request_id, {}))
                except STREAM_ERRORS:
                    return False  # the client said close and left without waiting: fine
                return True
            else:
                await self._send_error(framed, frame.request_id, p.BAD_REQUEST, f"unexpected {frame.type!r}")

    # ------------------------------------------------------------------ pushes from the previous hop

    async def handle_push(self, framed: FramedStream) -> None:
        await serve_pushes(self, framed)  # push_handler.py

    # ------------------------------------------------------------------ one step

    async def _step(self, session: ActiveSession, frame: Frame, relay: bool,
                    outbox: list[Outgoing] | None = None) -> None:
        """One step of a session; `outbox`: a bundled step's output waits there for the others'
        (step_bundles.py) instead of leaving on its own."""
        session.touch()
        step, last_only = frame.body.get("step"), frame.body.get("last", False)
        try:
            if type(step) is not int or step < 0:
                raise p.ProtocolError(p.BAD_REQUEST, "step must be a non-negative integer")
            if type(last_only) is not bool:
                raise p.ProtocolError(p.BAD_REQUEST, "last must be true or false")
            hidden, mask = p.decode_step_tensors(frame.body, p.PEER_WIRE_LIMITS, self.span.config.hidden_size,
                                                 session.batch_size, session.room)
            out = await self._compute(session, hidden, mask)
        except p.ProtocolError as exc:
            self.stats.errors += 1
            await self._send_error(session.client_stream, frame.request_id, exc.code, str(exc), step)
            return
        except Exception as exc:
            self.stats.errors += 1
            logger.exception("session %s: step %s failed", session.session_id.hex()[:8], step)
            await self._send_error(session.client_stream, frame.request_id, p.INTERNAL, f"step failed: {exc}", step)
            return
        if self.faults.active:
            if self.faults.should_drop():
                await session.client_stream.abort()
                return
            await trio.sleep(self.faults.delay_ms / 1000)
            out = self.faults.maybe_corrupt(out)
        self.stats.steps += 1
        self.stats.tokens += hidden.shape[0] * hidden.shape[1]
        session.steps_done += 1
        session.touch()
        answers_client = relay or session.push_stream is None
        if last_only and answers_client:
            out = out[:, -1:].contiguous()  # the client asked for the last position only (generation.run_step)
        if answers_client:
            target, reply = session.client_stream, Frame(p.RESULT, frame.request_id, {"step": step})
        else:
            target = session.push_stream
            reply = Frame(p.PUSH, frame.request_id, {"session_id": session.next_hop.session_id, "step": step,
                                                     "mask": frame.body["mask"]})
            if last_only:
                reply.body["last"] = True
        if outbox is not None and stackable(session):
            # encoded with the bundle's other outputs, in one tensor, when they leave (step_bundles.py);
            # an audited step's digest and tap as below (its tap gets its own copy of the output then)
            tap = None
            if session.tap and answers_client:
                reply.body["in_digest"] = p.tensor_digest(hidden)
            elif session.tap:
                tap = Frame(p.TAP, frame.request_id, {"step": step})
            outbox.append(Outgoing(session, frame.request_id, step, target, reply, tap, hidden, output=out, mask=mask))
            return
        # the codec for the link this output takes (molink.dht.codec_policy); a tap copy shares it
        tensor = await encode_hidden_async(out, session.compression, target)
        answer = {"step": step, "hidden": tensor}
        if answers_client:
            if session.tap:  # audited: say what input this output came from (spot checks, protocol.py)
                answer["in_digest"] = p.tensor_digest(hidden)
            reply.body = answer
        else:
            reply.body["hidden"] = tensor
            if not isinstance(reply.body["mask"], dict):  # an item of a stacked bundle: its rows of the stack
                reply.body["mask"] = encode_tensor(mask, codec="raw")
        # audited and pushing on: the client gets a copy (a tap) with its input's digest, both made
        # after the push has left, off the route's path
        tap = Frame(p.TAP, frame.request_id, answer) if session.tap and target is session.push_stream else None
        if outbox is not None:
            outbox.append(Outgoing(session, frame.request_id, step, target, reply, tap, hidden))
            return
        try:
            await target.send(reply)
        except STREAM_ERRORS as exc:
            code = p.NEXT_HOP_UNREACHABLE if target is session.push_stream else p.INTERNAL
            await self._send_error(session.client_stream, frame.request_id, code, f"forwarding failed: {exc}", step)
            return
        if tap is not None:
            await send_tap(self, session, frame.request_id, step, tap, hidden)

    async def _compute(self, session: ActiveSession, hidden, mask):
        if self.scheduler is not None:
            return await self.scheduler.submit(session.span, StepWork(session.span_session, hidden, mask))
        rows, blocks = hidden.shape[0] * hidden.shape[1], session.span_session.end - session.span_session.start
        expected = self.forward_cost.predict(rows, blocks)
        step = partial(session.span.step, session.span_session, hidden, mask)
        if expected is not None and expected < INLINE_COMPUTE_SECONDS and self.compute_limiter.borrowed_tokens == 0:
            output, seconds = timed(step)
        else:
            output, seconds = await trio.to_thread.run_sync(timed, step, limiter=self.compute_limiter)
        self.forward_cost.observe(rows, blocks, seconds)
        if hidden.shape[1] > 1:  # a prompt chunk
            self.prefill_cost.observe(rows, blocks, seconds)
        return output

    async def _send_error(self, framed: FramedStream, request_id: int, code: str, message: str,
                          step: int | None = None, limit: str | None = None) -> None:
        try:
            await framed.send(p.error_frame(request_id, code, message, step, limit))
        except STREAM_ERRORS:
            pass  # the client is gone: nobody left to tell

    # ------------------------------------------------------------------ info

    def info(self) -> dict:
        return {"peer_id": self.host.get_id().to_base58(), "model_key": self.model_key,
                "start": self.span.start, "end": self.span.end, "sessions": len(self.registry),
                "free_cache_tokens": self.registry.free_tokens, "steps": self.stats.steps,
                "push_channels": {"open": len(self.push_channels), "opened": self.push_channels.opened},
                "batching": self.scheduler.stats.as_dict() if self.scheduler is not None else None,
                "faults": {"corrupted_steps": self.faults.corrupted_steps, "dropped_steps": self.faults.dropped_steps}
                if self.faults.active else None}

    async def handle_info(self, framed: FramedStream) -> None:
        try:
            frame = await framed.receive(timeout=OPEN_TIMEOUT)
            await framed.send(Frame(p.INFO, frame.request_id, self.info()))
        except STREAM_ERRORS:
            return
