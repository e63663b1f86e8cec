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

Stacked: the items' hidden states travel as ONE tensor (and one mask) per bundle, each item
naming how many rows of it are its own (protocol.unstack_bundle): a decode step's tensor is a few
hundred bytes, and decoding, checking and encoding one per item per hop cost more than the batched
forward of a small model. Outputs of a lossless codec only (a q8 stack would share quantisation
blocks across sessions): a row decoded from the stack is then bit for bit what it would be alone,
so audited sessions stack too (their digests name the same values; a tap, the client's copy of a
pushed output, is encoded on its own). MOLINK_STACKED_BUNDLES=0 keeps one tensor per item.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
import trio

from molink.dht.codec_policy import encode_hidden_async
from molink.dht.streams import STREAM_ERRORS
from molink.dht.wire import Frame, encode_tensor
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
    output: Any = None  # not encoded yet (stackable): the output tensor, `frame` has no hidden
    mask: Any = None  # with output: the step's checked mask, pushed on with it


def stacking_enabled() -> bool:
    """MOLINK_STACKED_BUNDLES=0: every bundled item carries its own tensors (for comparison)."""
    return os.environ.get("MOLINK_STACKED_BUNDLES", "1") != "0"


def stackable(session) -> bool:
    """Whether a bundled step's output may leave stacked with others' (see the module doc)."""
    return session.compression != "q8" and stacking_enabled()


async def run_bundle(handler, frame: Frame, client: str | None = None) -> None:
    """Serve a `steps` (from `client`) or `pushes` frame: every item as a step of its session,
    all at once, then their outputs bundled."""
    try:
        items = p.unstack_bundle(frame.body, p.PEER_WIRE_LIMITS, handler.span.config.hidden_size)
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
        stack = [out for out in group if out.output is not None]
        if kind == "alone" or not stack_together([(out.output, out.session.compression) for out in stack]):
            for out in stack:
                await _encode_alone(out)
        if kind == "alone" or len(group) == 1:
            frames = [out.frame for out in group]
        else:
            frames = [await _bundle_frame(kind, part, carrier) for part in _parts(group)]
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
                if "hidden" not in out.tap.body:  # its output left stacked: the client's copy, on its own
                    out.tap.body["hidden"] = await encode_hidden_async(out.output, out.session.compression,
                                                                       out.session.client_stream)
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


def stack_together(pieces: list[tuple[torch.Tensor, str]]) -> bool:
    """Whether these (tensor, compression setting) pieces can share one stacked tensor: two or
    more, one dtype, one length, one codec setting. The client's steps frames use it too."""
    if len(pieces) < 2:
        return False
    tensor, compression = pieces[0]
    return all(other.dtype == tensor.dtype and other.shape[1:] == tensor.shape[1:] and mode == compression
               for other, mode in pieces)


async def _encode_alone(out: Outgoing) -> None:
    """A stackable output that leaves on its own after all: its tensors into its own frame."""
    out.frame.body["hidden"] = await encode_hidden_async(out.output, out.session.compression, out.target)
    if not isinstance(out.frame.body.get("mask", {}), dict):  # it came stacked: its rows, encoded
        out.frame.body["mask"] = encode_tensor(out.mask, codec="raw")
    if out.tap is not None:  # the tap shares the push's encoding, as a step served alone does
        out.tap.body["hidden"] = out.frame.body["hidden"]
    out.output = None


async def _bundle_frame(kind: str, part: list[Outgoing], carrier) -> Frame:
    """One pushes/results frame for a part of a group: the stackable outputs in one tensor."""
    items, stack = [], []
    for out in part:
        body = dict(out.frame.body)
        if out.output is not None:
            body.pop("mask", None)
            body["rows"] = out.output.shape[0]
            stack.append(out)
        if kind == "client":
            body["session_id"] = out.session.session_id
        items.append(body)
    body = {"items": items}
    if stack:
        hidden = torch.cat([out.output for out in stack]) if len(stack) > 1 else stack[0].output
        body["stacked"] = {"hidden": await encode_hidden_async(hidden, stack[0].session.compression, carrier)}
        if kind == "push":
            body["stacked"]["mask"] = encode_tensor(torch.cat([out.mask for out in stack]), codec="raw")
    return Frame(p.PUSHES if kind == "push" else p.RESULTS, 0, body)


def _parts(group: list[Outgoing]) -> list[list[Outgoing]]:
    return [group[i:i + p.MAX_BUNDLE_ITEMS] for i in range(0, len(group), p.MAX_BUNDLE_ITEMS)]
