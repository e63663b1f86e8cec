"""Step bundles on the client: the decode steps of many sessions to one first hop in one frame.

A client driving many generations at once (a notebook running a batch of prompts as separate
generations, the public endpoint serving many users) wakes many sessions at the same moment: the
shared lm_head (head_batcher.py) answers all that waited together. Each then sends its next
decode step to its first peer. Instead of one frame per session, the steps that are ready in the
same moment leave as one `steps` frame on the stream of one of them (peer/step_bundles.py: the
peers keep them bundled hop to hop, and the last hop answers with one `results` frame). Results
are handed to each session as if they had come on its own stream, so everything else a session
does (errors from any hop, timeouts, failover, closing) is unchanged.

Only decode steps of push-mode sessions are bundled; prompts travel alone, in chunks, as before.
Their hidden states travel stacked, one tensor (and one mask) for the whole bundle, each item
naming its rows (protocol.unstack_bundle); results come back the same way and are split here.
An audited session's taps still come on its own streams (swarm/spot_check.py matches them to
the step whatever stream its result came on).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import trio

from molink.dht.codec_policy import encode_hidden
from molink.dht.streams import STREAM_ERRORS
from molink.dht.wire import Frame, encode_tensor
from molink.peer import protocol as p
from molink.peer.session_limits import session_frame_bytes
from molink.peer.step_bundles import stack_together
from molink.swarm.cohorts import CohortGate

logger = logging.getLogger(__name__)

ITEM_OVERHEAD_BYTES = 256  # an item's keys, session id and tensor headers, generously


def bundles_enabled() -> bool:
    """MOLINK_STEP_BUNDLES=0 sends every step on its own (for comparison)."""
    return os.environ.get("MOLINK_STEP_BUNDLES", "1") != "0"


@dataclass
class BundleStats:
    frames: int = 0  # steps frames sent
    steps: int = 0  # decode steps that travelled in them
    alone: int = 0  # decode steps of a session that was the client's only one: sent at once
    stacked: int = 0  # steps frames whose items' tensors left stacked in one
    stacked_results: int = 0  # results frames that came back stacked

    def as_dict(self) -> dict:
        return {"frames": self.frames, "steps": self.steps, "alone": self.alone, "stacked": self.stacked,
                "stacked_results": self.stacked_results}


class StepBundles:
    """Shared by every session of one client (DistributedModelForCausalLM.step_bundles)."""

    def __init__(self, cohorts: CohortGate | None = None):
        self.cohorts = cohorts  # holds a bundle until its cohort is in (cohorts.py); None: never
        self._pending: dict[str, list[tuple[object, dict]]] = {}  # first hop -> (session, step body)
        self._sessions: dict[tuple[str, bytes], object] = {}  # (last hop, its session id) -> session
        self.stats = BundleStats()

    def register(self, session) -> None:
        self._sessions[(session.route[-1].peer_id, session.session_ids[-1])] = session

    def unregister(self, session) -> None:
        key = (session.route[-1].peer_id, session.session_ids[-1])
        if self._sessions.get(key) is session:
            del self._sessions[key]
        if self.cohorts is not None:
            self.cohorts.forget(session)

    def _only_session(self, session) -> bool:
        return len(self._sessions) == 1 and self._sessions.get(
            (session.route[-1].peer_id, session.session_ids[-1])) is session

    async def send(self, session, body: dict) -> None:
        """Queue a decode step for the session's first hop; the first session queued for that
        peer sends the bundle once every session woken with it has queued its own."""
        if self._only_session(session):  # nobody could join: it leaves now, no event-loop round spent waiting
            self.stats.alone += 1
            await self._send([(session, body)], session.hidden_size)
            return
        key = session.route[0].peer_id
        pending = self._pending.setdefault(key, [])
        pending.append((session, body))
        if self.cohorts is not None:
            self.cohorts.stepping(key, session, len(pending))
        if len(pending) > 1:
            return
        # shielded: the steps of other sessions ride on this send; a cancel here must not strand them
        # (the cohort wait is bounded by its own deadline)
        with trio.CancelScope(shield=True):
            owned = [pending]  # the queue this task must send: a newer one at `key` has its own carrier
            try:
                await trio.sleep(0)  # sessions woken in this same round queue theirs meanwhile
                await self._carry(key, session, owned)
            except BaseException as exc:  # whatever went wrong, no step queued here waits for nobody
                if owned[0] is not None and self._pending.get(key) is owned[0]:
                    error = exc if isinstance(exc, Exception) else RuntimeError("the bundle's carrier stopped")
                    for waiting, _ in self._pending.pop(key):
                        waiting.fail_hop(0, error)
                raise

    async def _carry(self, key: str, session, owned: list) -> None:
        # a bundle over its cohort's share leaves as that share; the rest is the next cohort's
        # start, which this task carries too once that cohort is in (whole: one split per
        # carrier, or a carrier could be kept from sending its own next step)
        limit = None
        for split in (True, False):
            if self.cohorts is not None:
                limit = await self.cohorts.wait(key, session, lambda: len(self._pending.get(key, ())))
            batch = self._pending.pop(key, [])
            rest = batch[limit:] if split and limit is not None else []
            if rest:
                batch, self._pending[key] = batch[:limit], rest
            owned[0] = rest or None
            await self._send(batch, session.hidden_size)
            if not rest:
                break

    async def _send(self, batch: list[tuple[object, dict]], hidden_size: int) -> None:
        """Send steps on the stream of an open session among them: one closed while the bundle
        waited (a user's cancel, a failover) must not take the others' steps down with it."""
        for session, _ in batch:
            if not session.is_open:
                session.fail_hop(0, RuntimeError("the session closed before its step left"))
        batch = [(session, body) for session, body in batch if session.is_open]
        for attempt in range(2):
            failed = []
            for part in _parts(batch, hidden_size):
                failed += await self._send_part(part, last_try=attempt == 1)
            if not failed:
                return
            batch = failed  # the carriers' own steps failed with them; the rest try another carrier

    async def _send_part(self, part: list[tuple[object, dict]], last_try: bool) -> list[tuple[object, dict]]:
        """Send one part; on a stream error the carrier's step fails, and the others' are returned
        to try again on another carrier (or failed too, on the last try)."""
        carrier = part[0][0]
        if len(part) == 1:
            frame = Frame(p.STEP, part[0][1]["step"], _encoded(*part[0]))
        else:
            frame = _steps_frame(part)
        try:
            await carrier.streams[0].send(frame)
        except STREAM_ERRORS as exc:
            carrier.fail_hop(0, exc)
            if not last_try:
                return part[1:]
            for session, _ in part[1:]:
                session.fail_hop(0, exc)
            return []
        if len(part) > 1:
            self.stats.frames += 1
            self.stats.steps += len(part)
            self.stats.stacked += "stacked" in frame.body
        return []

    def dispatch(self, peer_id: str, frame: Frame) -> None:
        """A `results` frame from peer_id: each item to its session, as that hop's `result`.
        Items for sessions that are not this peer's last hop, or are gone, are dropped."""
        try:
            items = p.bundle_items(frame.body)
        except p.ProtocolError as exc:
            logger.info("peer %s sent a bad results frame: %s", peer_id, exc)
            return
        sessions = [self._sessions.get((peer_id, item.get("session_id"))) if isinstance(item.get("session_id"), bytes)
                    else None for item in items]
        known = [session for session in sessions if session is not None]
        if not known:
            return
        try:
            items = p.unstack_bundle(frame.body, p.PEER_WIRE_LIMITS, known[0].hidden_size)
        except p.ProtocolError as exc:  # its stack does not add up: none of its answers can be trusted
            logger.info("peer %s sent a bad results frame: %s", peer_id, exc)
            for session in known:
                session.fail_hop(len(session.route) - 1, p.ProtocolError(p.BAD_REQUEST, f"bad results frame: {exc}"))
            return
        self.stats.stacked_results += "stacked" in frame.body
        for item, session in zip(items, sessions):
            if session is not None and type(item.get("step")) is int:
                session.deliver_result(Frame(p.RESULT, item["step"], item))


def _encoded(session, body: dict) -> dict:
    """A step body with its tensors encoded (they stay tensors until the bundle is made: see
    RemoteSession._step_body)."""
    if not isinstance(body.get("hidden"), torch.Tensor):
        return body
    return {**body, "hidden": encode_hidden(body["hidden"], session.compression, session.streams[0]),
            "mask": encode_tensor(body["mask"], codec="raw")}


def _steps_frame(part: list[tuple[object, dict]]) -> Frame:
    """A steps frame: the items' tensors stacked into one (when they are alike), else each its own."""
    stack = [(session, body) for session, body in part if isinstance(body.get("hidden"), torch.Tensor)]
    alike = stack_together([(body["hidden"], session.compression) for session, body in stack])
    items = []
    for session, body in part:
        if alike and isinstance(body.get("hidden"), torch.Tensor):
            item = {key: value for key, value in body.items() if key not in ("hidden", "mask")}
            item["rows"] = body["hidden"].shape[0]
        else:
            item = _encoded(session, body)
        items.append({**item, "session_id": session.session_ids[0]})
    frame_body = {"items": items}
    if alike:
        carrier = part[0][0]
        frame_body["stacked"] = {
            "hidden": encode_hidden(torch.cat([body["hidden"] for _, body in stack]), carrier.compression,
                                    carrier.streams[0]),
            "mask": encode_tensor(torch.cat([body["mask"] for _, body in stack]), codec="raw")}
    return Frame(p.STEPS, 0, frame_body)


def _parts(batch: list[tuple[object, dict]], hidden_size: int) -> list[list[tuple[object, dict]]]:
    """Split a bundle so that each part fits its carrier's frame bound at the first hop (the first
    session of each part: the peer sized that stream's frames to that session)."""
    parts: list[list[tuple[object, dict]]] = []
    room = 0
    for session, body in batch:
        size = session.batch_size * (hidden_size * 4 + 8) + ITEM_OVERHEAD_BYTES
        if not parts or size > room or len(parts[-1]) >= p.MAX_BUNDLE_ITEMS:
            parts.append([])
            room = session_frame_bytes(session.batch_size, session.max_length, hidden_size) // 2
        parts[-1].append((session, body))
        room -= size
    return parts
