"""Pushes from the previous hop (InferenceHandler.handle_push): the steps its sessions send on here.

Across a WAN one channel carries the steps of all of a previous hop's sessions that go on here
(push_channels.py); on loopback and LANs each session has a channel of its own. Either way every
push is served like a client's step of its session (handler._step), in the order it came.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import trio

from molink.dht.streams import STREAM_ERRORS, FramedStream
from molink.peer import protocol as p
from molink.peer.memory_cache import ActiveSession
from molink.peer.step_bundles import run_bundle

if TYPE_CHECKING:
    from molink.peer.handler import InferenceHandler

PUSH_QUEUE_FRAMES = 16  # a session's pushed steps waiting for its worker (prompt chunks come 8 at once)
PUSH_WORKER_IDLE = 10.0


async def serve_pushes(handler: InferenceHandler, framed: FramedStream) -> None:
    """Pushes from a previous hop: across a WAN one channel carries the steps of all its sessions
    that go on here (push_channels.py). Each session's steps then run in order on a worker of
    its own, so different sessions' steps meet in the scheduler's batches instead of queueing
    behind each other on the channel. A channel that has carried one session only (a session's
    own, on loopback and LANs) runs its steps inline: earlier steps are done before a second
    session's first one arrives, so the order holds when the workers take over."""
    workers: dict[bytes, trio.MemorySendChannel] = {}
    only: bytes | None = None  # the first session seen here; its steps run inline until another comes
    shared = False
    async with trio.open_nursery() as nursery:
        try:
            while True:
                try:
                    frame = await framed.receive(timeout=handler.idle_timeout)
                except STREAM_ERRORS:
                    return
                if frame.type == p.PUSHES:  # several sessions' steps at once (step_bundles.py)
                    await run_bundle(handler, frame)
                    continue
                if frame.type != p.PUSH:
                    return  # peers speak this protocol correctly or not at all
                try:
                    session_id = p.checked_session_id(frame.body.get("session_id"))
                except p.ProtocolError:
                    return
                session = handler.registry.get(session_id)
                if session is None:
                    continue  # closed meanwhile (or never ours): the client will time out or has moved on
                only = session_id if only is None else only
                shared = shared or session_id != only
                if not shared:
                    # a channel of one session's own (loopback, LAN): no hand-off to a worker
                    await handler._step(session, frame, relay=False)
                    continue
                for _ in range(2):
                    if session_id not in workers:
                        send, receive = trio.open_memory_channel(PUSH_QUEUE_FRAMES)
                        workers[session_id] = send
                        nursery.start_soon(_push_worker, handler, session, send, receive, workers)
                    try:
                        await workers[session_id].send(frame)  # a full queue holds the channel back
                        break
                    except trio.BrokenResourceError:  # its worker just ended (idle): start another
                        workers.pop(session_id, None)
        finally:
            for send in workers.values():
                send.close()  # the workers finish what they hold, then end


async def _push_worker(handler: InferenceHandler, session: ActiveSession, send: trio.MemorySendChannel,
                       frames: trio.MemoryReceiveChannel, workers: dict[bytes, trio.MemorySendChannel]) -> None:
    """One session's pushed steps, in arrival order, until the session or the channel ends (a
    worker of a quiet session checks every PUSH_WORKER_IDLE whether its session still exists)."""
    async with frames:
        while handler.registry.get(session.session_id) is session:
            frame = None
            with trio.move_on_after(PUSH_WORKER_IDLE):
                try:
                    frame = await frames.receive()
                except trio.EndOfChannel:
                    break
            if frame is not None and handler.registry.get(session.session_id) is session:
                await handler._step(session, frame, relay=False)
    if workers.get(session.session_id) is send:
        del workers[session.session_id]
