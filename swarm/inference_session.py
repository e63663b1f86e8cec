"""One generation's sessions on every peer of its route, and the steps that run through them.

The client opens one long-lived stream per hop. In push mode (the default) a step goes to the
first peer only; each peer pushes its output straight to the next, and the last peer answers on
the client's stream to it: k+1 one-way hops per token instead of k round trips. In relay mode the
client sends each hop its input and waits for its output (for debugging and for comparison).
Every stream is read all the time, so an error from any hop fails the step at once; heartbeats
on every stream detect a frozen peer within `HEARTBEAT_TIMEOUT`.
"""

from __future__ import annotations

import logging
import math
import os
from contextlib import AsyncExitStack

import torch
import trio
from libp2p.peer.id import ID

from molink.dht.host import connect_peer, with_peer_id
from molink.dht.direct import framed_data_stream, open_data_stream, release_data_stream
from molink.dht.codec_policy import DEFAULT_COMPRESSION, encode_hidden
from molink.dht.streams import STREAM_ERRORS, FramedStream
from molink.dht.wire import Frame, WireError, decode_tensor, encode_tensor
from molink.peer import protocol as p
from molink.peer.step_bundles import stackable
from molink.swarm.channel_pool import ChannelPool
from molink.swarm.inference_errors import InferenceError, as_inference_error
from molink.swarm.routing import RouteHop
from molink.swarm.spot_check import TappedStep
from molink.swarm.step_bundles import StepBundles

logger = logging.getLogger(__name__)

HEARTBEAT_INTERVAL = 1.0
HEARTBEAT_TIMEOUT = 5.0
OPEN_TIMEOUT = 15.0  # all hops answer `open`
CONNECT_TIMEOUT = 3.0  # per hop: a frozen peer still completes TCP handshakes, never Noise
DEFAULT_STEP_TIMEOUT = 120.0
TAP_TIMEOUT = 10.0  # a hop's tap trails the last hop's result by a push at most


class RemoteSession:
    def __init__(self, host, route: list[RouteHop], model_key: str, batch_size: int, max_length: int,
                 hidden_size: int, relay: bool = False, step_timeout: float = DEFAULT_STEP_TIMEOUT,
                 on_closed=None, direct: bool = True, tap: bool = False,
                 compression: str = DEFAULT_COMPRESSION, pool: ChannelPool | None = None,
                 bundles: StepBundles | None = None):
        self.host = host
        self.route = route
        self.model_key = model_key
        self.batch_size = batch_size
        self.max_length = max_length
        self.hidden_size = hidden_size
        self.relay = relay
        self.direct = direct  # direct data channels where peers offer them (molink.dht.direct)
        self.step_timeout = step_timeout
        self.streams: list[FramedStream] = []
        self.pool = pool  # warm streams from earlier sessions, and where ours go back (channel_pool.py)
        self._closed_cleanly: set[int] = set()  # hops that answered our `close`: their streams may be reused
        self._stepping = False  # a step is under way (or was cut short by an error or a cancel)
        self._events_send, self._events_recv = trio.open_memory_channel(math.inf)
        self._closing = trio.Event()
        self._closed = trio.Event()
        self._step = 0
        self._failure: Exception | None = None
        self.on_closed = on_closed  # called once with this session when it ends, however it ends
        self.compression = compression  # hidden states' codec, ours and every hop's (molink.dht.codec_policy)
        # tapped (spot checks, swarm/spot_check.py): every hop's input and output of every step
        self.tap = tap
        self.tapped: list[TappedStep] = []
        self._sent: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # step -> (hop 0 input, mask) until tapped
        self._taps: dict[tuple[int, int], Frame] = {}  # (hop, step) -> tap frame that came early
        # the last prompt pushed through in chunks: (their sizes, when it was sent, when each answer
        # came), for the prefill planner (prefill_plan.py); None until one is
        self.prompt_timing: tuple[list[int], float, list[float]] | None = None
        self._answered_at: dict[int, float | None] = {}  # a timed step -> when its answer was read off the wire
        # decode steps travel bundled with other sessions' (step_bundles.py): push mode only
        self.bundles = bundles if not relay else None
        self.session_ids: list[bytes] = []  # ours at each hop, once opened

    # ------------------------------------------------------------------ lifecycle

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Own the streams: open every hop, serve steps until close(). Start with nursery.start."""
        started = False
        try:
            async with AsyncExitStack() as stack:
                await self._open_streams(stack)
                async with trio.open_nursery() as nursery:
                    for index, stream in enumerate(self.streams):
                        nursery.start_soon(self._pump, index, stream)
                    await self._open_sessions()
                    if self.bundles is not None:
                        self.bundles.register(self)
                    started = True
                    task_status.started()
                    await self._closing.wait()
                    await self._say_goodbye()
                    nursery.cancel_scope.cancel()
        except Exception as exc:
            if not started:
                raise as_inference_error(exc) from exc
            self._failure = exc
            logger.debug("session ended with %r", exc)
        finally:
            if self.bundles is not None and self.session_ids:
                self.bundles.unregister(self)
            self._closed.set()
            if self.on_closed is not None:
                self.on_closed(self)

    def measured_rtts(self) -> dict[str, float]:
        """Heartbeat round trips seen on this session's streams, per peer."""
        return {hop.peer_id: stream.rtt for hop, stream in zip(self.route, self.streams) if stream.rtt}

    async def close(self, wait: bool = True) -> None:
        """End the session; `wait=False` lets the streams wind down in the background (a frozen
        peer must not hold up the re-route)."""
        self._closing.set()
        if wait:
            with trio.move_on_after(5):
                await self._closed.wait()

    async def _open_streams(self, stack: AsyncExitStack) -> None:
        """One stream per hop: a warm one from the pool, else a new one. The network part (connect,
        ticket, TCP) of every new hop runs in parallel — on a WAN each is several round trips —
        then each is framed (no I/O) in route order."""
        raw: list = [None] * len(self.route)
        warm = [self.pool.take(hop.peer_id) if self.pool is not None else None for hop in self.route]

        async def open_one(index: int, hop: RouteHop) -> None:
            try:
                raw[index] = await self._dial(hop, reconnect=False)
            except Exception:
                # one retry on a fresh connection: an old one may be half-dead after a failure
                try:
                    raw[index] = await self._dial(hop, reconnect=True)
                except Exception as exc:
                    raise InferenceError(f"cannot reach peer {hop.peer_id}: {exc}", hop.peer_id,
                                         unreachable=True) from exc

        try:
            async with trio.open_nursery() as nursery:
                for index, hop in enumerate(self.route):
                    if warm[index] is None:
                        nursery.start_soon(open_one, index, hop)
        except BaseException:
            for index, stream in enumerate(raw):
                if stream is not None:
                    await release_data_stream(stream)
                if warm[index] is not None:
                    self.pool.release(self.route[index].peer_id, warm[index], reuse=True)
            raise
        options = dict(limits=p.PEER_WIRE_LIMITS, heartbeat_interval=HEARTBEAT_INTERVAL,
                       heartbeat_timeout=HEARTBEAT_TIMEOUT)
        for index, stream in enumerate(raw):
            if self.pool is None:
                self.streams.append(await stack.enter_async_context(framed_data_stream(stream, **options)))
                continue
            framed = warm[index] if warm[index] is not None else await self.pool.adopt(stream, **options)
            self.streams.append(framed)
            stack.callback(self._release_stream, index, framed)

    def _release_stream(self, index: int, framed: FramedStream) -> None:
        self.pool.release(self.route[index].peer_id, framed, reuse=index in self._closed_cleanly)

    async def _dial(self, hop: RouteHop, reconnect: bool):
        await connect_peer(self.host, with_peer_id(hop.record.addrs, hop.peer_id), timeout=CONNECT_TIMEOUT,
                           reconnect=reconnect)
        return await open_data_stream(self.host, ID.from_base58(hop.peer_id), hop.record.addrs,
                                      p.INFERENCE_PROTOCOL, direct=self.direct, open_timeout=CONNECT_TIMEOUT)

    async def _open_sessions(self) -> None:
        session_ids = self.session_ids = [os.urandom(p.SESSION_ID_BYTES) for _ in self.route]
        for index, (hop, stream) in enumerate(zip(self.route, self.streams)):
            nxt = None
            if index + 1 < len(self.route) and not self.relay:
                following = self.route[index + 1]
                nxt = p.NextHop(following.peer_id, list(following.record.addrs), session_ids[index + 1])
            request = p.OpenRequest(session_ids[index], self.model_key, hop.start, hop.end, self.batch_size,
                                    self.max_length, nxt, tap=self.tap, compression=self.compression)
            await stream.send(Frame(p.OPEN, index + 1, request.to_body()))
        waiting = set(range(len(self.route)))
        with trio.fail_after(OPEN_TIMEOUT):
            while waiting:
                index, frame = await self._next_event()
                if frame.type == p.OPENED:
                    waiting.discard(index)

    async def _say_goodbye(self) -> None:
        """`close` to every hop; a hop that answers `closed` leaves its stream fit for reuse."""
        with trio.move_on_after(2):
            for index, stream in enumerate(self.streams):
                try:
                    await stream.send(Frame(p.CLOSE, 0, {}))
                except STREAM_ERRORS:
                    pass
            if self.pool is None or self._stepping:
                return  # nothing to keep them for / a step was cut short: its answers may trail
            waiting = set(range(len(self.streams)))
            try:
                while waiting:
                    index, frame = await self._next_event()
                    if frame.type == p.CLOSED:
                        waiting.discard(index)
                        self._closed_cleanly.add(index)
            except InferenceError:
                pass

    async def _pump(self, index: int, stream: FramedStream) -> None:
        """Read one hop's stream forever, forwarding frames (or its failure) to the step in flight."""
        while True:
            try:
                frame = await stream.receive(timeout=math.inf)
            except STREAM_ERRORS as exc:
                await self._events_send.send((index, exc))
                return
            if frame.type == p.RESULTS and self.bundles is not None:
                self.bundles.dispatch(self.route[index].peer_id, frame)  # other sessions' answers too
                continue
            step = frame.body.get("step") if frame.type == p.RESULT else None
            if type(step) is int and step in self._answered_at and self._answered_at[step] is None:
                self._answered_at[step] = trio.current_time()  # not when step_many gets to it
            await self._events_send.send((index, frame))

    def deliver_result(self, frame: Frame) -> None:
        """A bundled result for this session (step_bundles.py): as if the last hop sent it to us."""
        self._events_send.send_nowait((len(self.route) - 1, frame))

    @property
    def is_open(self) -> bool:
        """Neither closing nor failed: its streams may still carry other sessions' steps."""
        return not self._closing.is_set() and self._failure is None

    def fail_hop(self, index: int, error: Exception) -> None:
        """A bundle carrying our step could not be sent to hop `index`."""
        try:
            self._events_send.send_nowait((index, error))
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            pass  # the session is over: nobody waits for that step any more

    # ------------------------------------------------------------------ steps

    async def _expect(self, index: int, frame_type: str, timeout: float, step: int | None = None) -> Frame:
        with trio.fail_after(timeout):
            while True:
                hop, event = await self._next_event()
                if hop == index and event.type == frame_type and (step is None or event.body.get("step") == step):
                    return event
                tapped_step = event.body.get("step")
                if event.type == p.TAP and type(tapped_step) is int and tapped_step in self._sent \
                        and hop < len(self.route) - 1:
                    self._taps[(hop, tapped_step)] = event  # bounded: hops x steps in flight
                # anything else is stale (a late answer to an earlier, failed step): drop it

    async def _next_event(self) -> tuple[int, Frame]:
        """The next frame from any hop; a hop's failure or error frame raises InferenceError."""
        hop, event = await self._events_recv.receive()
        peer_id = self.route[hop].peer_id
        if isinstance(event, Exception):
            raise InferenceError(f"peer {peer_id} failed: {event}", peer_id) from event
        if event.type == p.ERROR:
            code, message = event.body.get("code"), event.body.get("message")
            if code == p.NEXT_HOP_UNREACHABLE and hop + 1 < len(self.route):
                # the peer is fine; the one after it is not: blame (and ban) the right one
                peer_id = self.route[hop + 1].peer_id
            raise InferenceError(f"peer {peer_id} answered {code}: {message}", peer_id, code)
        return hop, event

    async def step(self, hidden_states: torch.Tensor, new_mask: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        """The new tokens' hidden states through every hop; `last_only`: the last hop sends back
        only the last position (all a generation needs of a prompt: [batch, 1, hidden])."""
        if self._closing.is_set() or self._failure is not None:
            raise InferenceError(f"session is closed ({self._failure})")
        self._step += 1
        step = self._step
        self._stepping = True
        try:
            if self.relay:
                replies = []
                for index in range(len(self.streams)):
                    last = last_only and index == len(self.streams) - 1
                    hidden_states, reply = await self._send_and_wait(index, index, step, hidden_states, new_mask,
                                                                     relay=True, last=last)
                    replies.append((reply, hidden_states))
                if self.tap:
                    self._record_relayed(step, replies)
                self._stepping = False
                return hidden_states
            started = trio.current_time()
            out, reply = await self._send_and_wait(0, len(self.streams) - 1, step, hidden_states, new_mask,
                                                   relay=False, last=last_only)
            if hidden_states.shape[1] > 1:  # a prompt sent whole: what it took teaches the planner too
                self.prompt_timing = ([hidden_states.shape[1]], started, [trio.current_time()])
            if self.tap:
                await self._record_pushed(step, reply, out)
            self._stepping = False
            return out
        except trio.TooSlowError:
            raise InferenceError(f"step {step} got no answer within {self.step_timeout} s") from None

    async def step_many(self, items: list[tuple[torch.Tensor, torch.Tensor]],
                        last_only: bool = False) -> list[torch.Tensor]:
        """Consecutive steps, in push mode sent back to back without waiting: while a peer computes
        chunk i, chunk i+1 is already on its way, and its output travels on while it computes i+1.
        Each peer serves a session's steps in order, so the answers come back in order."""
        if self.relay or len(items) == 1:
            return [await self.step(hidden, mask, last_only) for hidden, mask in items]
        if self._closing.is_set() or self._failure is not None:
            raise InferenceError(f"session is closed ({self._failure})")
        sent: list[tuple[int, int]] = []
        self._stepping = True
        started = trio.current_time()
        self._answered_at = {self._step + 1 + i: None for i in range(len(items))}
        try:
            for hidden, mask in items:
                self._step += 1
                body = self._step_body(self._step, hidden, mask, relay=False, last=last_only)
                try:
                    await self.streams[0].send(Frame(p.STEP, self._step, body))
                except STREAM_ERRORS as exc:
                    raise InferenceError(f"peer {self.route[0].peer_id} failed: {exc}", self.route[0].peer_id) from exc
                sent.append((self._step, 1 if last_only else hidden.shape[1]))
            last = len(self.streams) - 1
            answers = []
            for step, new_tokens in sent:
                reply = await self._expect(last, p.RESULT, self.step_timeout, step)
                answers.append((step, reply, self._checked_hidden(reply, last, new_tokens)))
            arrivals = [self._answered_at.get(step) or trio.current_time() for step, _ in sent]
            self._answered_at = {}
            self.prompt_timing = ([hidden.shape[1] for hidden, _ in items], started, arrivals)
            if self.tap:  # after every result: a result must never arrive while we wait for a tap
                for step, reply, out in answers:
                    await self._record_pushed(step, reply, out)
            self._stepping = False
            return [out for _, _, out in answers]
        except trio.TooSlowError:
            raise InferenceError(f"steps {sent[0][0]}..{sent[-1][0]} got no answer within {self.step_timeout} s") from None

    def _step_body(self, step: int, hidden: torch.Tensor, mask: torch.Tensor, relay: bool, send_to: int = 0,
                   last: bool = False, stack: bool = False) -> dict:
        """`stack`: a bundled decode step whose tensors StepBundles encodes with the others'
        (stacked, one tensor per bundle) or alone: they stay tensors here."""
        stack = stack and stackable(self)  # the peers' rule (lossless codecs, stacking on)
        body = {"step": step, "hidden": hidden if stack else encode_hidden(hidden, self.compression, self.streams[send_to]),
                "mask": mask.to(torch.int64) if stack else encode_tensor(mask.to(torch.int64), codec="raw"),
                "relay": relay}
        if last:
            body["last"] = True
        if self.tap and (not relay or step not in self._sent):  # what hop 0 decodes, exactly
            # a lossless codec gives hop 0 exactly `hidden`; only a lossy one needs decoding here
            given = decode_tensor(body["hidden"], p.PEER_WIRE_LIMITS) if self.compression == "q8" else hidden
            self._sent[step] = (given, mask.long())
        return body

    async def _send_and_wait(self, send_to: int, answer_from: int, step: int, hidden: torch.Tensor,
                             mask: torch.Tensor, relay: bool, last: bool = False) -> tuple[torch.Tensor, Frame]:
        bundled = self.bundles is not None and not relay and hidden.shape[1] == 1
        body = self._step_body(step, hidden, mask, relay, send_to, last, stack=bundled)
        try:
            if bundled:
                await self.bundles.send(self, body)  # a decode step: with the others ready now
            else:
                await self.streams[send_to].send(Frame(p.STEP, step, body))
        except STREAM_ERRORS as exc:
            peer_id = self.route[send_to].peer_id
            raise InferenceError(f"peer {peer_id} failed: {exc}", peer_id) from exc
        reply = await self._expect(answer_from, p.RESULT, self.step_timeout, step)
        return self._checked_hidden(reply, answer_from, 1 if last else hidden.shape[1]), reply

    # ------------------------------------------------------------------ taps (spot checks)

    async def _record_pushed(self, step: int, last_reply: Frame, last_output: torch.Tensor) -> None:
        """Every hop's output of a pushed step: the non-last hops' taps, then the result."""
        first_input, mask = self._sent[step]  # kept until every tap is in: they may come in any order
        outputs, digests = [], []
        for hop in range(len(self.route) - 1):
            frame = self._taps.pop((hop, step), None)
            if frame is None:
                with trio.move_on_after(TAP_TIMEOUT):
                    frame = await self._expect(hop, p.TAP, TAP_TIMEOUT, step)
            if frame is None:
                peer_id = self.route[hop].peer_id
                raise InferenceError(f"peer {peer_id} sent no tap for step {step}", peer_id, p.BAD_REQUEST)
            outputs.append(self._checked_hidden(frame, hop, mask.shape[1]))
            digests.append(self._checked_digest(frame, hop))
        outputs.append(last_output)
        digests.append(self._checked_digest(last_reply, len(self.route) - 1))
        del self._sent[step]
        self.tapped.append(TappedStep(mask, [first_input, *outputs[:-1]], outputs, digests))

    def _record_relayed(self, step: int, replies: list[tuple[Frame, torch.Tensor]]) -> None:
        first_input, mask = self._sent.pop(step)
        outputs = [out for _, out in replies]
        digests = [self._checked_digest(reply, hop) for hop, (reply, _) in enumerate(replies)]
        self.tapped.append(TappedStep(mask, [first_input, *outputs[:-1]], outputs, digests))

    def _checked_digest(self, frame: Frame, index: int) -> bytes:
        digest = frame.body.get("in_digest")
        if not isinstance(digest, bytes) or len(digest) != 16:
            peer_id = self.route[index].peer_id
            raise InferenceError(f"peer {peer_id} did not name the input of a tapped step", peer_id, p.BAD_REQUEST)
        return digest

    def _checked_hidden(self, reply: Frame, index: int, new_tokens: int) -> torch.Tensor:
        peer_id = self.route[index].peer_id
        try:  # an item of a stacked results frame comes decoded (StepBundles.dispatch); never so from the wire
            out = reply.body.get("hidden")
            out = out if isinstance(out, torch.Tensor) else decode_tensor(out, p.PEER_WIRE_LIMITS)
        except WireError as exc:
            raise InferenceError(f"peer {peer_id} sent a bad tensor: {exc}", peer_id, p.BAD_REQUEST) from exc
        expected = [self.batch_size, new_tokens, self.hidden_size]
        if list(out.shape) != expected or out.dtype not in p.FLOAT_DTYPES:
            raise InferenceError(f"peer {peer_id} sent {out.dtype} {list(out.shape)}, expected {expected}",
                                 peer_id, p.BAD_REQUEST)
        return out
