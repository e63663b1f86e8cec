"""Choosing which peers run which blocks for one generation: the least expected time per token.

A route always runs a peer's span from wherever it enters (any block inside the span) to the
span's end (or the model's end), so the peer used last fixes where the route stands: the planner is
Dijkstra over "last peer" states. From the client (boundary 0) or from peer p (boundary p.end) the
route may continue with any q serving that boundary (q.start <= boundary < q.end), paying
  the delay to reach q
+ (q.end - boundary) blocks x load / q.throughput  (announced block-forwards per second; load =
  1 + sessions q announced + sessions this client runs on q, so sessions spread over replicas)
+ a penalty for relayed addresses (an extra hop through a relay),
and the last peer pays the way back to the client. The delay depends on the mode:
- push (default): hidden states go client -> p0 -> p1 -> ... -> pk -> client, so p -> q costs p's
  published RTT to q / 2 (SpanRecord.next_rtts, measured by p: peer/neighbours.py); unpublished
  pairs fall back to the client's RTT to q / 2 (measured by heartbeats, else DEFAULT_RTT). The first
  hop costs the client's RTT to p0 / 2 and the way back pk's RTT to the client / 2.
- relay: the client carries every hop itself, so each hop costs the client's full RTT to that peer.
Edges that fall back all cost the same from any state at one boundary, so each (boundary, q) pair
is relaxed by fallback once, from the cheapest state there (the first Dijkstra pops); published
pairs (<= 16 per peer) are relaxed one by one. Work ~ sum of span lengths + published pairs:
100 peers / 80 blocks plan in well under 10 ms (scripts/bench_routing.py). A little jitter per peer
breaks exact ties between identical replicas.
"""

from __future__ import annotations

import heapq
import random
import time
from dataclasses import dataclass, field

from molink.dht.records import SpanRecord

DEFAULT_RTT = 0.010  # seconds, for a peer we have never measured
RELAY_PENALTY = 0.020  # seconds per relayed hop
MIN_THROUGHPUT = 1e-3
JITTER = 0.05
LIAR_BAN = 3600.0  # seconds: a peer that lied once is not asked again for an hour


class NoRouteError(Exception):
    """The swarm does not cover every block right now (with the peers we may use)."""


@dataclass(frozen=True)
class RouteHop:
    record: SpanRecord
    start: int
    end: int

    @property
    def peer_id(self) -> str:
        return self.record.peer_id


@dataclass
class BanList:
    """Peers that failed us, each for a time that doubles with every failure (capped)."""

    base: float = 15.0
    cap: float = 300.0
    _until: dict[str, float] = field(default_factory=dict)
    _strikes: dict[str, int] = field(default_factory=dict)
    liars: set[str] = field(default_factory=set)  # caught lying at least once (never forgiven)

    def avoid(self, peer_id: str, seconds: float, now: float | None = None) -> None:
        """Keep away from a peer for a moment without counting a strike (it said "busy")."""
        now = time.monotonic() if now is None else now
        self._until[peer_id] = max(self._until.get(peer_id, 0.0), now + seconds)

    def ban(self, peer_id: str, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        strikes = self._strikes.get(peer_id, 0) + 1
        self._strikes[peer_id] = strikes
        duration = min(self.cap, self.base * 2 ** (strikes - 1))
        self._until[peer_id] = now + duration
        return duration

    def resting(self, now: float | None = None) -> set[str]:
        """Avoided right now only because they said "busy" (no strike): a route that needs them
        failed for lack of room, not for lack of peers."""
        now = time.monotonic() if now is None else now
        return {peer for peer, until in self._until.items() if until > now and peer not in self._strikes}

    def ban_liar(self, peer_id: str, now: float | None = None) -> float:
        """A peer caught returning wrong outputs (swarm/spot_check.py): out for LIAR_BAN seconds."""
        now = time.monotonic() if now is None else now
        self._strikes[peer_id] = self._strikes.get(peer_id, 0) + 1
        self._until[peer_id] = max(self._until.get(peer_id, 0.0), now + LIAR_BAN)
        self.liars.add(peer_id)
        return LIAR_BAN

    def struck(self, now: float | None = None) -> set[str]:
        """Banned for failing or lying (not merely avoided while busy): asked for nothing."""
        now = time.monotonic() if now is None else now
        return {peer for peer, until in self._until.items() if until > now and peer in self._strikes}

    def forgive(self, peer_id: str) -> None:
        """A peer that served a whole session well starts from a clean slate (a liar does not)."""
        if peer_id in self.liars:
            return
        self._strikes.pop(peer_id, None)
        self._until.pop(peer_id, None)

    def banned(self, now: float | None = None) -> set[str]:
        now = time.monotonic() if now is None else now
        return {peer for peer, until in self._until.items() if until > now}


def coverage_gaps(records: list[SpanRecord], num_blocks: int) -> list[tuple[int, int]]:
    covered = [False] * num_blocks
    for r in records:
        for i in range(r.start, min(r.end, num_blocks)):
            covered[i] = True
    gaps, start = [], None
    for i, c in enumerate(covered + [True]):
        if not c and start is None:
            start = i
        elif c and start is not None:
            gaps.append((start, i))
            start = None
    return gaps


def is_relayed(record: SpanRecord) -> bool:
    return bool(record.addrs) and all("/p2p-circuit" in a for a in record.addrs)


def make_route(records: list[SpanRecord], num_blocks: int, *, banned: set[str] = frozenset(),
               rtts: dict[str, float] | None = None, load: dict[str, int] | None = None,
               min_free_tokens: int = 0, rng: random.Random | None = None, relay: bool = False,
               punched: set[str] | frozenset[str] = frozenset()) -> list[RouteHop]:
    """The cheapest chain of hops covering blocks [0, num_blocks).

    rtts: the client's own round trips to peers (seconds); load: sessions this client runs on each
    peer; relay: plan for a client that relays every hop (RemoteSession(relay=True)); punched: peers
    announcing only relayed addresses whose data channel the client hole-punched (no relay penalty).
    """
    rtts, load, rng = rtts or {}, load or {}, rng or random
    usable = [r for r in records if r.peer_id not in banned and r.end > r.start and r.addrs
              and r.free_cache_tokens >= min_free_tokens]
    n = len(usable)
    ids = [r.peer_id for r in usable]
    index = {peer: i for i, peer in enumerate(ids)}
    starts = [r.start for r in usable]
    ends = [min(r.end, num_blocks) for r in usable]
    client_rtt = [rtts.get(peer, DEFAULT_RTT) for peer in ids]
    # One-way delay to q when nobody published one (push) / the client's whole round trip (relay).
    reach = client_rtt if relay else [rtt / 2 for rtt in client_rtt]
    back = [0.0] * n if relay else reach  # relay: the round trip above already came back
    per_block = [(1 + r.sessions + load.get(r.peer_id, 0)) / max(r.throughput, MIN_THROUGHPUT) for r in usable]
    penalty = [RELAY_PENALTY if is_relayed(r) and r.peer_id not in punched else 0.0 for r in usable]
    jitter = [1 + JITTER * rng.random() for _ in usable]
    covering: list[list[int]] = [[] for _ in range(num_blocks)]
    for q in range(n):
        for b in range(starts[q], ends[q]):
            covering[b].append(q)

    target = n  # a pseudo-state: back at the client with every block done
    dist = [float("inf")] * (n + 1)
    prev = [-1] * (n + 1)  # -1: entered from the client
    queue: list[tuple[float, int]] = []

    def relax(q: int, cost: float, came_from: int) -> None:
        if cost < dist[q]:
            dist[q], prev[q] = cost, came_from
            heapq.heappush(queue, (cost, q))

    for q in covering[0] if num_blocks else ():
        relax(q, (reach[q] + ends[q] * per_block[q] + penalty[q]) * jitter[q], -1)
    # Per boundary, the peers not yet relaxed by fallback (see the module docstring).
    pending: dict[int, list[int]] = {}
    while queue:
        cost, i = heapq.heappop(queue)
        if i == target:
            break
        if cost > dist[i]:
            continue
        b = ends[i]
        if b >= num_blocks:
            relax(target, cost + back[i], i)
            continue
        published = {} if relay else usable[i].next_rtt_map
        unpublished_left = []
        for q in pending.get(b, covering[b]):
            if ids[q] in published:
                unpublished_left.append(q)  # a later state at b may lack a published rtt to q
            else:
                relax(q, cost + (reach[q] + (ends[q] - b) * per_block[q] + penalty[q]) * jitter[q], i)
        pending[b] = unpublished_left
        for peer, rtt in published.items():
            q = index.get(peer)
            if q is not None and starts[q] <= b < ends[q]:
                relax(q, cost + (rtt / 2 + (ends[q] - b) * per_block[q] + penalty[q]) * jitter[q], i)
    if prev[target] == -1:
        gaps = coverage_gaps(usable, num_blocks)
        roomy = [r for r in records if r.peer_id not in banned and r.end > r.start and r.addrs]
        if min_free_tokens and not coverage_gaps(roomy, num_blocks):
            raise NoRouteError(f"busy: no peers with KV-cache room for {min_free_tokens} tokens cover blocks {gaps} "
                               f"(try a shorter generation or a smaller batch, or wait)")
        raise NoRouteError(f"no route covers all {num_blocks} blocks (uncovered with usable peers: {gaps}; "
                           f"{len(banned)} peer(s) banned)")
    hops, i = [], prev[target]
    while i != -1:
        entered = ends[prev[i]] if prev[i] != -1 else 0
        hops.append(RouteHop(usable[i], entered, ends[i]))
        i = prev[i]
    return hops[::-1]
