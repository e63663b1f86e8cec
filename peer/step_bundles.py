"""Step bundles on the peer: many sessions' decode steps in one frame, at every hop.

Under load most of a decode step's cost on a small model is not the forward (the scheduler
batches those) but everything around it, once per session per hop: a frame read and decoded, a
task woken, an output encoded, a frame sealed and written, a socket woken on the other side. A
client driving many sessions sends the decode steps that are ready together as one `steps` frame
(swarm/step_bundles.py), on the stream of one of them; this peer runs them side by side (they
meet in one batched forward), then sends their outputs on as one `pushes` frame per next-hop
peer, on the push stream of one of the sessions going there; the last hop answers with one
`results` frame per client, on the client stream of one of its sessions.

Nothing else changes: each item is served exactly like a `step` of its own session (the same
checks, the same KV cache, errors on that session's own client stream), so a bad item fails
only its session. A `steps` item must belong to a session the same client opened (a client
cannot step someone else's session); pushes, like single pushes, are taken by session id.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import trio

from molink.dht.streams import STREAM_ERRORS
from molink.dht.wire import Frame
from molink.peer import protocol as p

logger = logging.getLogger(__name__)


@dataclass
class Outgoing:
    """One bundled step's output, waiting to leave with the others (see send_outgoing)."""

    session: Any  # ActiveSession
    request_id: int
    step: int
    target: Any  # the FramedStream it would have gone on alone
    frame: Frame  # what it would have sent alone: push to the next hop, or result to the client
    tap: Frame | None = None  # spot checks' copy for the client: sent after the bundle, off its path
    tap_input: Any = None  # with a tap: the step's input, whose digest the tap names (see send_tap)


async def run_bundle(handler, frame: Frame, client: str | None = None) -> None:
    """Serve a `steps` (from `client`) or `pushes` frame: every item as a step of its session,
    all at once, then their outputs bundled."""
    try:
        items = p.bundle_items(frame.body)
    except p.ProtocolError as exc:
        logger.info("bundle refused: %s", exc)
        return
    outbox: list[Outgoing] = []
    order: dict[int, int] = {}
    async with trio.open_nursery() as nursery:
        for item in items:
            session = _session_of(handler, item, client, frame.type == p.STEPS)
            if session is not None and id(session) not in order:  # a session's step once per bundle
                order[id(session)] = len(order)
                nursery.start_soon(handler._step, session, Frame(p.STEP, frame.request_id, item), False, outbox)
    # in the bundle's order, not the order they finished in: the first item's streams carry the bundle on
    outbox.sort(key=lambda out: order[id(out.session)])
    await send_outgoing(handler, outbox)


def _session_of(handler, item: dict, client: str | None, from_client: bool):
    try:
        session = handler.registry.get(p.checked_session_id(item.get("session_id")))
    except p.ProtocolError:
        return None
    if session is None:
        return None  # closed meanwhile (or never ours), as with single pushes
    if from_client and (client is None or session.client != client or session.client_stream is None):
        return None  # only the client that opened a session steps it
    return session


async def send_outgoing(handler, outbox: list[Outgoing]) -> None:
    """Group the outputs by where they go (a next-hop peer, or a client) and send one frame per
    group on the stream of one of its sessions; a failed send fails each of its sessions' steps."""
    groups: dict[tuple, list[Outgoing]] = {}
    for out in outbox:
        session = out.session
        if out.target is session.push_stream and session.next_hop is not None:
            key: tuple = ("push", session.next_hop.peer_id)
        elif out.target is session.client_stream and session.client is not None:
            key = ("client", session.client)
        else:
            key = ("alone", id(out))
        groups.setdefault(key, []).append(out)
    for (kind, _), group in groups.items():
        # a session that closed while the bundle ran may have had its stream handed on or closed
        carrier = next((out.target for out in group if handler.registry.get(out.session.session_id) is out.session),
                       group[0].target)
        if kind == "alone" or len(group) == 1:
            frames = [out.frame for out in group]
        elif kind == "push":
            frames = [Frame(p.PUSHES, 0, {"items": [out.frame.body for out in part]})
                      for part in _parts(group)]
        else:
            frames = [Frame(p.RESULTS, 0, {"items": [{**out.frame.body, "session_id": out.session.session_id}
                                                      for out in part]}) for part in _parts(group)]
        try:
            for frame in frames:
                await carrier.send(frame)
        except STREAM_ERRORS as exc:
            code = p.NEXT_HOP_UNREACHABLE if kind == "push" else p.INTERNAL
            for out in group:
                await handler._send_error(out.session.client_stream, out.request_id, code,
                                          f"forwarding failed: {exc}", out.step)
            continue
        for out in group:
            if out.tap is not None:
                await send_tap(handler, out.session, out.request_id, out.step, out.tap, out.tap_input)


async def send_tap(handler, session, request_id: int, step: int, tap: Frame, step_input) -> None:
    """A spot-check tap, sent once its output has left: it trails its push (the client waits for
    it up to TAP_TIMEOUT; the next hop must not wait for it at all), and so does the digest of the
    step's input it names."""
    tap.body["in_digest"] = p.tensor_digest(step_input)
    try:
        await session.client_stream.send(tap)
    except STREAM_ERRORS as exc:
        await handler._send_error(session.client_stream, request_id, p.INTERNAL, f"tap failed: {exc}", step)


def _parts(group: list[Outgoing]) -> list[list[Outgoing]]:
    return [group[i:i + p.MAX_BUNDLE_ITEMS] for i in range(0, len(group), p.MAX_BUNDLE_ITEMS)]
