"""What a forward costs: how it grows with the rows it carries (the client plans micro-batches with
it, swarm/pipeline_cost.py) and what one costs on this peer, learned from the forwards it runs (the
peer decides from it what runs inline and how long to wait for a batch, peer/scheduler.py); and what
a prompt chunk costs per token (PrefillCost: announced in the span record, the client sizes prompt
chunks with it, swarm/prefill_plan.py)."""

from __future__ import annotations

import math
import statistics
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")


@dataclass
class Line:
    """seconds = fixed + per_row x rows."""

    fixed: float
    per_row: float

    def at(self, rows: float) -> float:
        return self.fixed + self.per_row * rows

    @classmethod
    def through(cls, times: Callable[[int], float], small: int = 1, large: int = 257) -> "Line":
        per_row = max(0.0, (times(large) - times(small)) / (large - small))
        return cls(max(0.0, times(small) - per_row * small), per_row)

    @classmethod
    def fitted(cls, samples: list[tuple[float, float]]) -> "Line | None":
        """Least squares through (rows, seconds) samples (None: no samples). Samples of one size, or
        noise giving a slope of zero or less or a negative fixed part: the line through zero and
        their mean (more rows never cost less, and what grows with them must not be missed)."""
        if not samples:
            return None
        mean_rows = statistics.fmean(rows for rows, _ in samples)
        mean_seconds = statistics.fmean(seconds for _, seconds in samples)
        slope = least_squares_slope(samples)
        fixed = mean_seconds - slope * mean_rows
        if slope <= 0 or fixed < 0:
            return cls(0.0, mean_seconds / mean_rows)
        return cls(fixed, slope)


def least_squares_slope(points: list[tuple[float, float]]) -> float:
    """The least-squares slope of seconds in rows through (rows, seconds) points; 0 for one size."""
    mean_rows = statistics.fmean(rows for rows, _ in points)
    mean_seconds = statistics.fmean(seconds for _, seconds in points)
    spread = sum((rows - mean_rows) ** 2 for rows, _ in points)
    if spread == 0:
        return 0.0
    return sum((rows - mean_rows) * (seconds - mean_seconds) for rows, seconds in points) / spread


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


# Prompt chunks of fewer tokens are mostly a step's fixed costs; they say little about the slope.
PREFILL_MIN_TOKENS = 16
PREFILL_SAMPLES = 32
PREFILL_PROBE_TOKENS = (32, 128)  # what a peer measures at start, through its span


class PrefillCost:
    """What a prompt chunk costs on this peer per block: seconds = fixed + per_token x tokens, fitted
    to the prompt forwards it ran, with the two measured at start kept in the fit.

    Not the decode curve: a decode step reads every weight for a few rows (flat in rows at first),
    a prompt chunk's cost grows with every token. The decode curve scaled by the decode throughput
    was 3x too high per token for the tiny test model and 2x too low for SmolLM2 on this project's
    CPUs (tiny, 2 blocks: 1.5 ms at 64 tokens, 3.2 at 256; SmolLM2, 10 blocks: 71 / 270 ms)."""

    def __init__(self, start_samples: list[tuple[int, float]] | None = None, samples: int = PREFILL_SAMPLES):
        self._start = list(start_samples or [])  # (tokens, seconds per block), measured at start
        self._recent: deque[tuple[int, float]] = deque(maxlen=samples)

    def observe(self, tokens: int, blocks: int, seconds: float) -> None:
        if tokens >= PREFILL_MIN_TOKENS and blocks > 0 and seconds > 0:
            self._recent.append((tokens, seconds / blocks))

    def line(self) -> Line | None:
        """Seconds per block of a chunk of n tokens, or None while nothing is known."""
        return Line.fitted([*self._start, *self._recent])


def measure_prefill(run_chunk: Callable[[int], None], tokens: tuple[int, ...] = PREFILL_PROBE_TOKENS,
                    repeats: int = 3) -> list[tuple[int, float]]:
    """(tokens, seconds) of the quickest of `repeats` prompt chunks of each size that `run_chunk(n)`
    runs. The sizes take turns, so that a burst of other work (peers starting side by side) slows
    one round of each, not one size."""
    run_chunk(tokens[0])  # warm-up
    best = dict.fromkeys(tokens, math.inf)
    for _ in range(repeats):
        for n in tokens:
            best[n] = min(best[n], timed(lambda: run_chunk(n))[1])
    return list(best.items())
