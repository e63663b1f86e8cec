"""Choosing which peers run which blocks for one generation.

For now: a greedy cover — from the first uncovered block, the announced span that reaches
furthest (ties: higher throughput, then more free cache), skipping banned peers. A peer may be
used for the tail of its span (sub-span). Load- and latency-aware routing comes with churn.
"""

from __future__ import annotations

from dataclasses import dataclass

from molink.dht.records import SpanRecord


class NoRouteError(Exception):
    """The swarm does not cover every block right now."""


@dataclass(frozen=True)
class RouteHop:
    record: SpanRecord
    start: int
    end: int

    @property
    def peer_id(self) -> str:
        return self.record.peer_id


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


def make_route(records: list[SpanRecord], num_blocks: int, banned: set[str] = frozenset(),
               batch_tokens: int = 0) -> list[RouteHop]:
    usable = [r for r in records if r.peer_id not in banned and r.end > r.start and r.addrs
              and r.free_cache_tokens >= batch_tokens]
    route, cursor = [], 0
    while cursor < num_blocks:
        candidates = [r for r in usable if r.start <= cursor < r.end]
        if not candidates:
            gaps = coverage_gaps(usable, num_blocks)
            raise NoRouteError(f"no peer serves block {cursor} (uncovered blocks: {gaps})")
        best = max(candidates, key=lambda r: (min(r.end, num_blocks), r.throughput, r.free_cache_tokens))
        end = min(best.end, num_blocks)
        route.append(RouteHop(best, cursor, end))
        cursor = end
    return route
