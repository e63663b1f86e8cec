"""What a forward costs: how it grows with the rows it carries (the client plans micro-batches with
it, swarm/pipeline_cost.py) and what one costs on this peer, learned from the forwards it runs (the
peer decides from it what runs inline and how long to wait for a batch, peer/scheduler.py)."""

from __future__ import annotations

import statistics
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class CostCurve:
    """Cost of b rows relative to one row: flat up to `free_rows` (a decode step reads every weight
    once however many rows it carries), then +1 per `rows_per_extra` rows."""

    free_rows: float
    rows_per_extra: float

    def factor(self, rows: float) -> float:
        return 1.0 + max(0.0, rows - self.free_rows) / self.rows_per_extra


# Measured on this project's CI machine, one core per process (median of 8 decode steps):
# 10 SmolLM2 blocks 23.7 / 23.7 / 31.3 / 44.2 ms at 1 / 8 / 16 / 32 rows.
# GPUs stay flat far longer; an underestimate only makes us split less (and thread more).
BLOCKS_CURVE = CostCurve(free_rows=8, rows_per_extra=28)


class ForwardCost:
    """What one single-row forward through one block costs on this peer, learned from the forwards it
    runs: the median of the last `samples`, each scaled back by the curve to one row and one block.

    The throughput measured at start is only the first guess: peers starting side by side on one
    machine measure each other's loading (three peers of one box announced 844 to 1549 block-steps/s
    for the same blocks), and a guess that is 2x too slow sends every tiny forward through a thread
    hand-off that costs more than the forward itself.
    """

    def __init__(self, throughput: float = 0.0, samples: int = 32, curve: CostCurve | None = None):
        self.curve = curve or BLOCKS_CURVE
        self._prior = 1.0 / throughput if throughput > 0 else None
        self._recent: deque[float] = deque(maxlen=samples)
        self._estimate = self._prior

    @property
    def block_seconds(self) -> float | None:
        """Seconds of one row through one block; None while nothing is known (no start measure, no forward)."""
        return self._estimate

    def predict(self, rows: int, blocks: int) -> float | None:
        """Seconds of one forward of `rows` token rows (a prompt chunk: each token a row) through `blocks`."""
        if self._estimate is None:
            return None
        return self._estimate * blocks * self.curve.factor(rows)

    def observe(self, rows: int, blocks: int, seconds: float) -> None:
        if rows <= 0 or blocks <= 0 or not seconds > 0:
            return
        self._recent.append(seconds / (blocks * self.curve.factor(rows)))
        self._estimate = statistics.median(self._recent)


def timed(run: Callable[[], T]) -> tuple[T, float]:
    """Run it; what it returned and its seconds, measured where it runs (in a worker thread: without
    the hand-off, which is not the forward's cost)."""
    started = time.perf_counter()
    result = run()
    return result, time.perf_counter() - started
