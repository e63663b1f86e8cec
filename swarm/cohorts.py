"""Cohorts: a client's concurrent generations kept in a few groups that step together.

Generations woken together step together (step_bundles.py), and the peers keep a bundle together
hop to hop, so a group of sessions that once travelled as one tends to stay one. But groups form
by accident (sessions start at different moments, prompts take different times) and then stay
small: 32 SmolLM2 sessions on 3 local peers settled into ~5 groups of ~7, so every peer ran
~5 forwards per token of everyone where 2 would do, and on a CPU a forward of 16 rows costs
about what one of 4 does (a decode step reads every weight once, however many rows it carries).

The cohort count is the one micro-batching uses for a batch of that many rows
(pipeline_cost.py, MoLink's rule generalised to a route: enough groups to keep every stage busy,
no more): the client holds a bundle for a first hop until decoding // k of its sessions have their step
ready, or until COHORT_WAIT_FRACTION of those sessions' recent step interval has passed (a
straggler or a session in its prompt must not stall the rest), and a bundle of more than
ceil(decoding / k) steps leaves as that many, the rest waiting as the start of the next cohort:
groups only ever merge by themselves, so without the split 20 + 12 would stay 20 + 12, the
smaller waiting out its deadline every round. Where the rule
says k = 1 (splitting predicts no gain: a tiny model, whose steps are mostly fixed costs) nothing
is held. Where it says many (a WAN: the links' delay dominates) the target is small and met at
once. Measured, 32 SmolLM2 sessions x 64 tokens, 3 local peers, 2 cores: 121.0-127.4 tok/s at
ITL p50 245-251 ms without, 165.7-183.5 tok/s at 168-179 ms with (k = 2), back to back.
Only sessions that stepped within STALE_INTERVALS of the pace count as decoding (an idle one or
one in a long prompt is not waited for); fewer than MIN_SESSIONS: nothing held. A failure to
count cohorts groups nothing; a carrier that fails leaves no step behind it (step_bundles.py).
MOLINK_COHORTS=0 turns it off.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable

import trio

logger = logging.getLogger(__name__)

COHORT_WAIT_FRACTION = 0.3  # hold a bundle at most this share of the sessions' step interval
MAX_COHORT_WAIT = 0.25  # seconds, whatever the interval
INTERVAL_SMOOTHING = 0.1  # weight of a new step interval in the running average
MIN_SESSIONS = 4  # fewer decoding sessions: nothing to group
STALE_INTERVALS = 3  # a session silent for this many step intervals is not counted as decoding
PACE_CHANGE_SAMPLES = 16  # this many paused-looking intervals in a row: the pace itself changed


def cohorts_enabled() -> bool:
    return os.environ.get("MOLINK_COHORTS", "1") not in ("0", "off", "false")


class CohortGate:
    """Per first hop: which sessions are decoding, how often they step, and how long a bundle waits.

    `count(session, n)` answers how many cohorts n decoding sessions on that session's route
    should form (the client's micro-batch rule); it is asked at most once per route and n.
    """

    def __init__(self, count: Callable[[object, int], int]):
        self.count = count
        self._decoding: dict[str, set] = {}  # first hop -> sessions that sent decode steps
        self._last_send: dict[object, float] = {}  # session -> when it last sent one
        self._interval: dict[str, float] = {}  # first hop -> running average of a session's step interval
        self._skipped: dict[str, int] = {}  # first hop -> interval samples skipped in a row (pauses)
        self._counts: dict[tuple, int] = {}
        self._ready: dict[str, trio.Event] = {}  # first hop -> set when its bundle reaches its target
        self._targets: dict[str, int] = {}
        self.held = 0  # bundles held for their cohort
        self.held_seconds = 0.0  # how long, all together

    def stepping(self, key: str, session, queued: int) -> None:
        """A decode step of `session` was queued for first hop `key` (`queued` steps wait now)."""
        now = trio.current_time()
        self._decoding.setdefault(key, set()).add(session)
        last = self._last_send.get(session)
        if last is not None:
            self._observe(key, now - last)
        self._last_send[session] = now
        if queued >= self._targets.get(key, math.inf):
            self._ready[key].set()

    def _observe(self, key: str, sample: float) -> None:
        """A session's step interval into the hop's running average. A sample over STALE_INTERVALS x
        the average is a pause (the session was idle or in a prompt), not the pace, and is skipped;
        PACE_CHANGE_SAMPLES of them in a row mean the pace itself changed: start over from them."""
        average = self._interval.get(key)
        if average is not None and sample > STALE_INTERVALS * average:
            self._skipped[key] = self._skipped.get(key, 0) + 1
            if self._skipped[key] < PACE_CHANGE_SAMPLES:
                return
            average = None
        self._skipped[key] = 0
        self._interval[key] = sample if average is None else average + INTERVAL_SMOOTHING * (sample - average)

    def forget(self, session) -> None:
        for sessions in self._decoding.values():
            sessions.discard(session)
        self._last_send.pop(session, None)

    async def wait(self, key: str, carrier, queued: Callable[[], int]) -> int | None:
        """Hold the bundle for `key` until its cohort is in (see the module doc); returns the most
        steps one bundle should carry (a larger one is split: the rest form the next cohort), or
        None for no limit."""
        interval = self._interval.get(key)
        if interval is None:
            return None
        now = trio.current_time()  # sessions that stopped stepping (idle, in a prompt) are not waited for
        decoding = sum(1 for s in self._decoding.get(key, ()) if now - self._last_send[s] <= STALE_INTERVALS * interval)
        if decoding < MIN_SESSIONS:
            return None
        k = self._cohorts(carrier, decoding)
        if k <= 1:
            return None
        # wait for the smaller share, carry at most the larger: 31 sessions in 2 cohorts are 15 + 16
        target, limit = decoding // k, math.ceil(decoding / k)
        if queued() >= target:
            return limit
        self._targets[key], self._ready[key] = target, trio.Event()
        self.held += 1
        started = trio.current_time()
        try:
            with trio.move_on_after(min(MAX_COHORT_WAIT, COHORT_WAIT_FRACTION * interval)):
                await self._ready[key].wait()
        finally:
            del self._targets[key], self._ready[key]
            self.held_seconds += trio.current_time() - started
        return limit

    def _cohorts(self, carrier, decoding: int) -> int:
        key = (tuple(hop.peer_id for hop in carrier.route), decoding)
        if key not in self._counts:
            if len(self._counts) > 1024:
                self._counts.clear()
            try:
                self._counts[key] = self.count(carrier, decoding)
            except Exception:  # noqa: BLE001 - no cohort count is no reason to stop anyone's steps
                logger.warning("cohort count failed; not grouping", exc_info=True)
                self._counts[key] = 1
        return self._counts[key]
