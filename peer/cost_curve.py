"""How a forward's cost grows with the rows it carries: the peers' scheduler decides from it what
runs inline (peer/scheduler.py), the client plans micro-batches with it (swarm/pipeline_cost.py)."""

from __future__ import annotations

from dataclasses import dataclass


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
