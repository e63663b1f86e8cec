"""Round trips from this peer to its next hops, for the span record (SpanRecord.next_rtts).

In push mode a token travels client -> p0 -> p1 -> ... -> pk -> client, so the delay between two
consecutive hops is p_i's round trip to p_i+1: something no client can measure, only p_i. Every peer
therefore pings the peers it would push to (records with start <= my end < their end), keeps a
smoothed RTT per peer, and publishes up to MAX_NEXT_RTTS of them in its signed record; the client's
planner (swarm/routing.py) charges half of it per hop.

A ping is one request on the INFO protocol over an already established connection: the connect
(TCP + Noise + muxer) is done first and not timed, so the figure is what a push pays per token.
One round every ~interval s (jittered, so peers started together do not probe in lockstep) costs
one DHT lookup and <= 16 tiny requests. A successor that does not answer within PROBE_TIMEOUT is
published at PROBE_TIMEOUT: "I cannot reach it quickly" is worth telling clients (they would
otherwise pair us and lose a session to next_hop_unreachable); an answer replaces it at once.
When the published map changes materially the record is re-announced at once instead of waiting
for the next periodic announce (<= one extra announce per round), so a new successor shows up in
clients' plans within a round.
"""

from __future__ import annotations

import logging
import math
import os
import random
from collections.abc import Callable

import trio

from molink.dht.kademlia import SwarmDHT
from molink.dht.records import MAX_NEXT_RTTS, MAX_RTT, SpanRecord
from molink.peer.liveness import ask_info

logger = logging.getLogger(__name__)

PROBE_INTERVAL = 30.0  # seconds between rounds: the same pace as re-announcing the record
PROBE_INTERVAL_ENV = "MOLINK_PROBE_INTERVAL"  # tests shorten it; 0 switches probing off
JITTER = 0.2  # +-20 % per round
PROBE_TIMEOUT = 3.0  # connect + one request; slower than this is "unreachable" for routing purposes
LOOKUP_TIMEOUT = 10.0
ANNOUNCE_TIMEOUT = 10.0
CONCURRENCY = 4  # parallel pings: a 2-core volunteer is serving tokens meanwhile
SMOOTHING = 0.3  # weight of a new sample: one slow answer (a GC pause) moves the figure by 30 %
EXPLORE_SLOTS = 4  # with more successors than MAX_NEXT_RTTS, this many slots go to peers not yet measured
MIN_RTT = 1e-6  # records require rtt > 0; a loopback answer can round to nothing on a coarse clock


def probe_interval_from_env() -> float:
    """PeerConfig's default: PROBE_INTERVAL unless MOLINK_PROBE_INTERVAL says otherwise."""
    raw = os.environ.get(PROBE_INTERVAL_ENV)
    if raw is None:
        return PROBE_INTERVAL
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{PROBE_INTERVAL_ENV} must be a number of seconds, got {raw!r}") from None
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{PROBE_INTERVAL_ENV} must be >= 0 seconds, got {raw!r}")
    return value


def successors(records: list[SpanRecord], my_peer_id: str, end: int) -> list[SpanRecord]:
    """The peers this one would push to: they serve block `end`, the first one after our span."""
    return [r for r in records if r.peer_id != my_peer_id and r.start <= end < r.end and r.addrs]


def changed_materially(old: dict[str, float], new: dict[str, float]) -> bool:
    """Worth an announce now: another set of peers, or an RTT that moved by half (and >= 2 ms)."""
    if old.keys() != new.keys():
        return True
    return any(abs(new[k] - old[k]) > max(0.002, 0.5 * old[k]) for k in new)


class NeighbourProber:
    def __init__(self, host, dht: SwarmDHT, model_key: str, span: Callable[[], tuple[int, int] | None],
                 num_blocks: int, *, interval: float = PROBE_INTERVAL,
                 record: Callable[[], SpanRecord | None] | None = None, rng: random.Random | None = None):
        self.host = host
        self.dht = dht
        self.model_key = model_key
        self.span = span  # the span now (a rebalance may move it): (start, end), None while unknown
        self.num_blocks = num_blocks
        self.interval = interval
        self.record = record  # what to announce at once when the map changes (None: never)
        self.rng = rng or random.Random()
        self.me = host.get_id().to_base58()
        self.rtts: dict[str, float] = {}  # peer id -> smoothed RTT (s), this round's successors only
        self.rounds = 0
        self._announced: dict[str, float] = {}

    def published(self) -> dict[str, float]:
        """What the span record carries: <= MAX_NEXT_RTTS entries, each within the record's bounds."""
        best = sorted(self.rtts.items(), key=lambda kv: kv[1])[:MAX_NEXT_RTTS]
        return {peer: min(max(rtt, MIN_RTT), MAX_RTT * 0.99) for peer, rtt in best}

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Probe every ~interval s until cancelled; a failed round is logged and retried next time."""
        task_status.started()
        # The first round comes soon: peers that joined together find each other within seconds.
        await trio.sleep(self.interval * self.rng.uniform(0.1, 0.3))
        while True:
            try:
                await self.probe_round()
            except Exception:  # a bug or a libp2p surprise must not take the peer down
                logger.warning("probing the next hops failed; retrying next round", exc_info=True)
            await trio.sleep(self.interval * self.rng.uniform(1 - JITTER, 1 + JITTER))

    async def probe_round(self) -> None:
        span = self.span()
        if span is None:
            return
        if span[1] >= self.num_blocks:
            self.rtts = {}  # the last span pushes to nobody: the client is its next hop
        else:
            records = None
            with trio.move_on_after(LOOKUP_TIMEOUT):
                records = await self.dht.find_spans(self.model_key)
            if records is None:
                logger.info("span lookup for the next-hop probe timed out; keeping the last figures")
                return
            self.rtts = await self._probe(self._choose(successors(records, self.me, span[1])))
        self.rounds += 1
        published = self.published()
        if self.record is not None and changed_materially(self._announced, published):
            await self._announce_now(published)

    def _choose(self, candidates: list[SpanRecord]) -> list[SpanRecord]:
        """All of them when they fit; else the best measured ones plus a few new ones to explore."""
        if len(candidates) <= MAX_NEXT_RTTS:
            return candidates
        known = sorted((r for r in candidates if r.peer_id in self.rtts), key=lambda r: self.rtts[r.peer_id])
        unknown = [r for r in candidates if r.peer_id not in self.rtts]
        self.rng.shuffle(unknown)
        keep = known[:MAX_NEXT_RTTS - min(EXPLORE_SLOTS, len(unknown))]
        return (keep + unknown + known[len(keep):])[:MAX_NEXT_RTTS]

    async def _probe(self, targets: list[SpanRecord]) -> dict[str, float]:
        """Smoothed RTTs of `targets` (peers not probed this round are dropped: not next hops now)."""
        limiter = trio.CapacityLimiter(CONCURRENCY)
        fresh: dict[str, float] = {}

        async def one(record: SpanRecord) -> None:
            async with limiter:
                sample = await self.ping(record)
            old = self.rtts.get(record.peer_id)
            if sample is None:
                fresh[record.peer_id] = PROBE_TIMEOUT
            elif old is None or old >= PROBE_TIMEOUT:  # first figure, or back from unreachable
                fresh[record.peer_id] = sample
            else:
                fresh[record.peer_id] = (1 - SMOOTHING) * old + SMOOTHING * sample

        async with trio.open_nursery() as nursery:
            for record in targets:
                nursery.start_soon(one, record)
        return fresh

    async def ping(self, record: SpanRecord) -> float | None:
        """One INFO round trip to the record's peer in seconds, or None when it fails or is slow."""
        answer = await ask_info(self.host, record, PROBE_TIMEOUT)
        if answer is None:
            logger.info("next hop %s did not answer a probe within %.0f s", record.peer_id, PROBE_TIMEOUT)
            return None
        return answer.rtt

    async def _announce_now(self, published: dict[str, float]) -> None:
        record = self.record()
        if record is None:  # leaving, or not serving yet: the periodic announcer handles it
            return
        with trio.move_on_after(ANNOUNCE_TIMEOUT):
            try:
                await self.dht.announce(record)
                self._announced = published
                logger.info("announced RTTs to %d next hop(s)", len(published))
            except Exception as exc:
                logger.info("announcing the next-hop RTTs failed (the periodic announce will carry them): %s", exc)
