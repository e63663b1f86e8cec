"""Which blocks a peer should serve: pure functions over the swarm's span records.

Everything here works on "SpanRecord-like" objects (anything with peer_id, start, end and
throughput) and the model's block count, so it can be tested without a network.

Coverage. A record's `throughput` is block-forwards per second (one decode token, batch 1): the
rate at which that peer can push tokens through ANY ONE of its blocks. So the capacity the swarm
has at block i is `coverage[i] = Σ throughput of the live peers whose span contains i`, and the
swarm as a whole is only as good as its weakest block: the *bottleneck* `min(coverage)` (0 while
any block is uncovered: then no client can run the model at all). This is Petals' measure.

Joining (`choose_window`): among the windows of `length` consecutive blocks, take the one that
maximises the bottleneck after adding ourselves. While a gap remains elsewhere that bottleneck is 0
for every window, so ties are broken by (1) fewer uncovered blocks left (fill the largest part of
the gaps we can), (2) the lowest current coverage sum of the window (Petals: go where the swarm is
weakest), (3) the lowest start (determinism: equal peers seeing equal state choose alike, and the
rebalancer's re-check separates them).

How many blocks (`choose_num_blocks`): Petals fills memory. We fill memory too, but no further
than the peer's speed justifies: a peer serving k blocks spends k/throughput seconds per token, so
its span's token rate is throughput/k. A peer should not become a slower hop than the swarm's
median hop, so k <= throughput / median(peer throughput / peer blocks) (rounded). A peer twice as
fast therefore takes twice the blocks of a slow peer with the same memory. One exception: while
the swarm has gaps, covering them beats speed (an uncovered block serves nobody), so the peer
takes at least the longest gap's length if memory allows. An empty swarm means "all of it".

Rebalancing (`rebalance_decision`): a peer moves only if (a) it keeps covering every block that
only it serves (leaving such a block would open a gap: clients would fail) — so a sole server of
its whole span never moves, but one that shares part of it may shift over a neighbouring gap —
(b) its best window (chosen as above with itself removed, among the windows allowed by (a))
differs from where it is, and (c) the bottleneck after the move beats the current one by Petals'
margin: new > current / BALANCE_QUALITY (0.75). The margin is hysteresis: throughputs are noisy
measurements, and small gains are not worth reloading blocks, breaking sessions' routes, or two
peers trading places forever.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Protocol, Sequence

BALANCE_QUALITY = 0.75  # Petals' margin: move only if the bottleneck improves by more than 1/0.75


class SpanLike(Protocol):
    peer_id: str
    start: int
    end: int
    throughput: float


def block_coverage(records: Sequence[SpanLike], num_blocks: int) -> list[float]:
    """Σ throughput of the peers serving each block (withdrawals and out-of-range parts ignored)."""
    coverage = [0.0] * num_blocks
    for r in records:
        for i in range(max(r.start, 0), min(r.end, num_blocks)):
            coverage[i] += r.throughput
    return coverage


def coverage_with(coverage: Sequence[float], start: int, end: int, throughput: float) -> list[float]:
    return [c + throughput if start <= i < end else c for i, c in enumerate(coverage)]


def bottleneck(coverage: Sequence[float]) -> float:
    return min(coverage) if coverage else 0.0


def _window_key(coverage: Sequence[float], start: int, length: int, throughput: float) -> tuple:
    after = coverage_with(coverage, start, start + length, throughput)
    uncovered_after = sum(1 for c in after if c <= 0)
    # max() of this key: highest bottleneck, fewest gaps left, weakest window now, lowest start.
    return (bottleneck(after), -uncovered_after, -sum(coverage[start:start + length]), -start)


def choose_window(records: Sequence[SpanLike], num_blocks: int, length: int, throughput: float,
                  must_cover: tuple[int, int] | None = None) -> tuple[int, int]:
    """The window [start, start+length) a peer of `throughput` should take (see module doc).

    `must_cover` (lo, hi): only windows containing blocks lo..hi-1 (the caller makes sure one does).
    """
    length = max(1, min(length, num_blocks))
    coverage = block_coverage(records, num_blocks)
    starts = range(num_blocks - length + 1)
    if must_cover is not None:
        starts = [s for s in starts if s <= must_cover[0] and must_cover[1] <= s + length]
    best = max(starts, key=lambda s: _window_key(coverage, s, length, throughput))
    return best, best + length


def gaps(coverage: Sequence[float]) -> list[tuple[int, int]]:
    out, start = [], None
    for i, c in enumerate([*coverage, 1.0]):
        if c <= 0 and start is None:
            start = i
        elif c > 0 and start is not None:
            out.append((start, i))
            start = None
    return out


def memory_fit(usable_bytes: int, block_bytes: int, kv_bytes_per_block: int = 0, fixed_kv_bytes: int = 0) -> int:
    """How many blocks fit in `usable_bytes` with their KV budget (per block and/or fixed)."""
    per_block = block_bytes + kv_bytes_per_block
    if per_block <= 0:
        raise ValueError("a block must take some memory")
    return max(0, (usable_bytes - fixed_kv_bytes) // per_block)


def choose_num_blocks(fit: int, throughput: float, records: Sequence[SpanLike], num_blocks: int) -> int:
    """Blocks to host: memory fit, capped by speed, but enough to close the longest gap (module doc)."""
    fit = min(fit, num_blocks)
    if fit < 1:
        return 0
    rates = [r.throughput / (r.end - r.start) for r in records if r.end > r.start and r.throughput > 0]
    if not rates:
        return fit  # nobody to compare with (or nobody at all): fill memory, like Petals
    speed_cap = max(1, math.floor(throughput / statistics.median(rates) + 0.5))
    longest_gap = max((b - a for a, b in gaps(block_coverage(records, num_blocks))), default=0)
    return min(fit, max(speed_cap, longest_gap))


@dataclass(frozen=True)
class RebalanceDecision:
    move: bool
    reason: str
    current: float  # the swarm's bottleneck now
    new: float  # the bottleneck if we moved to `window` (== current when we stay put)
    window: tuple[int, int]  # where we would go (our current span when there is nowhere better)


def rebalance_decision(records: Sequence[SpanLike], me: SpanLike, num_blocks: int,
                       quality: float = BALANCE_QUALITY) -> RebalanceDecision:
    """Should peer `me` (at its current span) move? `records` may or may not contain `me`."""
    others = [r for r in records if r.peer_id != me.peer_id]
    here = (me.start, me.end)
    current = bottleneck(block_coverage([*others, me], num_blocks))
    without_me = block_coverage(others, num_blocks)
    alone = [i for i in range(me.start, min(me.end, num_blocks)) if without_me[i] <= 0]
    keep = (alone[0], alone[-1] + 1) if alone else None  # blocks we may not leave: nobody else has them
    best = choose_window(others, num_blocks, me.end - me.start, me.throughput, must_cover=keep)
    if best == here:
        reason = f"leaving would uncover blocks {keep[0]}..{keep[1] - 1}" if keep else "already at the best window"
        return RebalanceDecision(False, reason, current, current, here)
    new = bottleneck(coverage_with(without_me, *best, me.throughput))
    if new <= 0 or new * quality <= current:
        return RebalanceDecision(False, f"gain too small ({current:.1f} -> {new:.1f})", current, new, best)
    return RebalanceDecision(True, f"bottleneck {current:.1f} -> {new:.1f}", current, new, best)
