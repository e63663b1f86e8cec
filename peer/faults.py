"""Fault injection for tests: a peer that lies, lags or hangs up, on purpose.

Off unless the environment variable MOLINK_FAULTS is set on `molink-peer join`, e.g.

    MOLINK_FAULTS="corrupt=0.05,delay_ms=200,drop=0.01,seed=7" molink-peer join ...

  corrupt=P   each computed step's output is corrupted with probability P (noise added to every
              value, the shape and dtype unchanged: it looks like an honest answer)
  delay_ms=D  every step's answer is held back D milliseconds
  drop=P      with probability P per step, the session's client stream is reset instead of answered
  seed=S      the random generator's seed (default: random), so a test can replay a schedule

The peer says so loudly at start (a WARNING per fault), so nobody runs one by accident. It is for
the untrusted-peer and churn tests: the swarm must notice, route around, and stay exact.
"""

from __future__ import annotations

import logging
import os
import random
from dataclasses import dataclass, field

import torch

logger = logging.getLogger(__name__)

FAULTS_ENV = "MOLINK_FAULTS"
CORRUPTION_SCALE = 0.5  # noise std relative to each output's own std: wrong, but plausible


class FaultSpecError(ValueError):
    pass


@dataclass
class Faults:
    corrupt: float = 0.0
    delay_ms: float = 0.0
    drop: float = 0.0
    seed: int | None = None
    rng: random.Random = field(default_factory=random.Random, repr=False)
    corrupted_steps: int = 0
    dropped_steps: int = 0

    @property
    def active(self) -> bool:
        return bool(self.corrupt or self.delay_ms or self.drop)

    @classmethod
    def parse(cls, spec: str) -> "Faults":
        values: dict[str, float] = {}
        for part in filter(None, (p.strip() for p in spec.split(","))):
            name, _, raw = part.partition("=")
            if name not in ("corrupt", "delay_ms", "drop", "seed") or not raw:
                raise FaultSpecError(f"{FAULTS_ENV}: unknown or empty setting {part!r}")
            try:
                values[name] = float(raw)
            except ValueError:
                raise FaultSpecError(f"{FAULTS_ENV}: {name} must be a number, got {raw!r}") from None
        for name in ("corrupt", "drop"):
            if not 0.0 <= values.get(name, 0.0) <= 1.0:
                raise FaultSpecError(f"{FAULTS_ENV}: {name} is a probability in [0, 1]")
        if values.get("delay_ms", 0.0) < 0:
            raise FaultSpecError(f"{FAULTS_ENV}: delay_ms must not be negative")
        seed = int(values["seed"]) if "seed" in values else None
        return cls(values.get("corrupt", 0.0), values.get("delay_ms", 0.0), values.get("drop", 0.0), seed,
                   random.Random(seed))

    @classmethod
    def from_env(cls) -> "Faults":
        spec = os.environ.get(FAULTS_ENV, "")
        faults = cls.parse(spec) if spec else cls()
        if faults.active:
            logger.warning("FAULT INJECTION ON (%s=%r): this peer corrupts %.0f %% of its outputs, delays every "
                           "answer %.0f ms and drops %.0f %% of its sessions' steps. For tests only.",
                           FAULTS_ENV, spec, 100 * faults.corrupt, faults.delay_ms, 100 * faults.drop)
        return faults

    def should_drop(self) -> bool:
        hit = self.drop > 0 and self.rng.random() < self.drop
        self.dropped_steps += hit
        return hit

    def maybe_corrupt(self, out: torch.Tensor) -> torch.Tensor:
        if not (self.corrupt > 0 and self.rng.random() < self.corrupt):
            return out
        self.corrupted_steps += 1
        generator = torch.Generator().manual_seed(self.rng.getrandbits(63))
        noise = torch.randn(out.shape, generator=generator, dtype=torch.float32).to(out.dtype)
        return out + noise * (out.float().std().clamp_min(1e-3) * CORRUPTION_SCALE).to(out.dtype)
