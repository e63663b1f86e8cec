"""Spot checks: the client re-runs some peers' work on other peers and catches the ones that lie.

Anyone can join a public swarm, and a peer can return plausible garbage. With spot checks on,
every hop of a session is *tapped*: a non-last hop sends the client a copy of its output and every
hop names (by digest) the input it got (peer/protocol.py). The client then knows, for each step,
what each hop was given and what it answered. Two checks use that:

- Links, every step (cheap): hop k+1 must have got exactly what hop k tapped. If not, one of the two
  pushed something else than it showed us; we cannot tell which, so both are avoided for a while
  and the generation rolls back to that step.
- Audits, for a random fraction `rate` of the hops of each session: the audited hop's inputs are
  re-run, in one chunk per audit, by another peer serving the same blocks (the *verifier*, one
  long-lived session per audited hop, fed every `every` steps and at the end), and its outputs are
  compared position by position within a tolerance fitted to the dtype (a re-run in one chunk
  rounds differently from step by step). On a mismatch a third peer replays the history up to the
  first bad step and its answer decides who lied; the liar is banned and reported, and the
  generation rolls back to the first bad step and goes on through other peers — so its tokens stay
  what transformers gives.

Peers cannot tell audited sessions from others (every session is tapped), so behaving well only
when watched does not work. Detection probability per session for a peer that corrupts a fraction
f of n steps: rate x (1 - (1 - f)^n); measured in scripts/bench_spot_check.py with its cost.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import torch

from molink.peer import protocol as p
from molink.swarm.inference_errors import InferenceError

logger = logging.getLogger(__name__)

# Largest allowed |verifier - hop| at a position, relative to max(1, max |value| there). A re-run in
# one chunk matches step-by-step results to ~1e-6 in fp32 (different matmul shapes round
# differently); half precisions round to 3 (fp16) or 2 (bf16) decimal digits. The corruption a
# liar needs to change a token is far above these.
TOLERANCE = {torch.float32: 1e-3, torch.float16: 1e-2, torch.bfloat16: 5e-2}
DEFAULT_RATE = 0.1
DEFAULT_EVERY = 8
VERIFIER_RETRY_SECONDS = 30.0  # no verifier for a hop: look again this much later (records refresh every 15 s)


@dataclass(frozen=True)
class SpotCheckConfig:
    rate: float = DEFAULT_RATE  # probability that a hop of a session is audited
    every: int = DEFAULT_EVERY  # an audited hop is re-run every `every` steps (and at the end)
    seed: int | None = None

    def __post_init__(self):
        if not 0.0 <= self.rate <= 1.0:
            raise ValueError(f"spot-check rate must be in [0, 1], got {self.rate}")
        if self.every < 1:
            raise ValueError(f"spot-check interval must be >= 1 step, got {self.every}")

    @classmethod
    def of(cls, value: "SpotCheckConfig | float | None") -> "SpotCheckConfig":
        if isinstance(value, SpotCheckConfig):
            return value
        return cls(rate=DEFAULT_RATE if value is None else float(value))


@dataclass
class TappedStep:
    """What every hop of a session got and answered for one step."""

    mask: torch.Tensor  # [batch, new]
    inputs: list[torch.Tensor]  # per hop
    outputs: list[torch.Tensor]  # per hop
    in_digests: list[bytes]  # per hop: the digest of the input the hop says it got


class LiarDetected(Exception):
    """Some peer's output was wrong from session step `first_bad_step` on (0-based)."""

    def __init__(self, message: str, liars: set[str], first_bad_step: int, proven: bool):
        super().__init__(message)
        self.liars = liars
        self.first_bad_step = first_bad_step
        self.proven = proven  # a third opinion settled it (else: avoid all suspects, not a ban)


# (start, end, exclude, urgent): urgent = a dispute hangs on it, look the swarm up again if need be
OpenVerifier = Callable[[int, int, set[str], bool], Awaitable[object | None]]


@dataclass
class HopAudit:
    verified: int = 0  # steps [0, verified) of the hop agreed with a verifier
    verifier: object | None = None  # a RemoteSession on another peer, relay mode, one hop
    verifier_steps: int = 0  # steps the verifier has seen (its KV cache)
    unverifiable: bool = False  # nobody else served these blocks at the last try (said once in the log)
    retry_at: float = 0.0  # when to look for a verifier again (a lookup per step would cost a DHT query each)


def mismatched_positions(got: torch.Tensor, claimed: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Bool [new]: positions where the two disagree beyond the dtype's tolerance (padding ignored)."""
    tol = max(TOLERANCE.get(got.dtype, 1e-2), TOLERANCE.get(claimed.dtype, 1e-2))
    a, b = got.float(), claimed.float()
    diff = torch.nan_to_num((a - b).abs(), nan=float("inf")).amax(dim=2)  # [batch, new]
    scale = torch.nan_to_num(b.abs(), nan=0.0).amax(dim=2).clamp_min(1.0)
    bad = (diff > tol * scale) & (mask != 0)
    return bad.any(dim=0)


def _disagree(rerun: torch.Tensor, step: TappedStep, k: int, claimed: torch.Tensor | None = None) -> bool:
    """Does hop k's output of `step` (or `claimed`) differ from a re-run of it? A last hop asked for
    its last position only (a prompt's other positions feed nothing) is held to the positions it sent."""
    claimed = step.outputs[k] if claimed is None else claimed
    n = claimed.shape[1]
    return bool(mismatched_positions(rerun[:, -n:], claimed, step.mask[:, -n:]).any())


def _segment(tensor: torch.Tensor, tapped: list[TappedStep], start: int, upto: int, step: int) -> torch.Tensor:
    """The positions of `step` in a re-run covering steps [start, upto)."""
    offset = sum(s.mask.shape[1] for s in tapped[start:step])
    return tensor[:, offset:offset + tapped[step].mask.shape[1]]


@dataclass
class Auditor:
    """Checks one FailoverChain's sessions. `open_verifier(start, end, exclude)` opens a one-hop
    relay session on another peer serving blocks [start, end) (None when there is none);
    `ban_liar(peer_id)` bans a verifier caught lying (liars on the route are the chain's to ban)."""

    config: SpotCheckConfig
    open_verifier: OpenVerifier
    struck: Callable[[], set[str]] = set  # peers already banned: never asked for an opinion
    ban_liar: Callable[[str], None] = lambda peer_id: None
    rng: random.Random | None = None  # share one across a client's chains: a fresh seeded one each
    # time would audit the same hops of every generation
    audits: dict[int, HopAudit] = field(default_factory=dict)
    links_checked: int = 0
    failed_verifiers: set[str] = field(default_factory=set)  # not asked again by this chain
    stats: dict[str, int] = field(default_factory=lambda: {"audits": 0, "steps_rerun": 0, "tokens_rerun": 0,
                                                            "third_opinions": 0, "lies_caught": 0})

    def __post_init__(self):
        if self.rng is None:
            self.rng = random.Random(self.config.seed)

    @property
    def taps(self) -> bool:
        return self.config.rate > 0

    def attach(self, session) -> None:
        """A new session (route) of the chain: pick which of its hops to audit, secretly."""
        self.audits = {k: HopAudit() for k in range(len(session.route)) if self.rng.random() < self.config.rate}
        self.links_checked = 0

    async def detach(self) -> None:
        for audit in self.audits.values():
            if audit.verifier is not None:
                await audit.verifier.close(wait=False)
        self.audits = {}

    async def after_steps(self, session) -> None:
        self._check_links(session)
        for k, audit in self.audits.items():
            if len(session.tapped) - audit.verified >= self.config.every:
                await self._audit(session, k, audit)

    async def settle(self, session) -> None:
        """End of a generation: audited hops are checked up to the last step."""
        self._check_links(session)
        for k, audit in self.audits.items():
            if len(session.tapped) > audit.verified:
                await self._audit(session, k, audit)

    # ------------------------------------------------------------------ links

    def _check_links(self, session) -> None:
        for index in range(self.links_checked, len(session.tapped)):
            step = session.tapped[index]
            for k, (given, said) in enumerate(zip(step.inputs, step.in_digests)):
                if p.tensor_digest(given) != said:
                    suspects = {session.route[k].peer_id}
                    if k > 0:
                        suspects.add(session.route[k - 1].peer_id)
                    self.stats["lies_caught"] += 1
                    raise LiarDetected(f"hop {k} says it got other hidden states than "
                                       f"{'we sent' if k == 0 else 'its predecessor showed us'} at step {index}",
                                       suspects, index, proven=(k == 0))
        self.links_checked = len(session.tapped)

    # ------------------------------------------------------------------ audits

    def _excluded(self, *peer_ids: str) -> set[str]:
        return set(peer_ids) | self.struck() | self.failed_verifiers

    async def _audit(self, session, k: int, audit: HopAudit) -> None:
        hop = session.route[k]
        upto = len(session.tapped)
        while audit.verified < upto:
            if audit.verifier is None:
                if time.monotonic() < audit.retry_at:
                    return
                audit.verifier = await self.open_verifier(hop.start, hop.end, self._excluded(hop.peer_id), False)
                audit.verifier_steps = 0
                if audit.verifier is None:
                    if not audit.unverifiable:
                        logger.info("spot check: no other peer serves blocks [%d, %d) now; hop %s goes "
                                    "unchecked until one does", hop.start, hop.end, hop.peer_id)
                    audit.unverifiable = True
                    audit.retry_at = time.monotonic() + VERIFIER_RETRY_SECONDS
                    return
            start, verifier_id = audit.verifier_steps, audit.verifier.route[0].peer_id
            got = await self._rerun(audit.verifier, session.tapped, k, start, upto)
            if got is None:  # the verifier failed: another one replays from the start
                self.failed_verifiers.add(verifier_id)
                await audit.verifier.close(wait=False)
                audit.verifier = None
                continue
            audit.verifier_steps = upto
            self.stats["audits"] += 1
            bad = self._first_disagreement(got, session.tapped, k, start, audit.verified, upto)
            if bad is None:
                audit.verified = upto
                return
            await self._settle_dispute(session, k, audit, bad, _segment(got, session.tapped, start, upto, bad))

    async def _rerun(self, verifier, tapped: list[TappedStep], k: int, start: int, upto: int):
        """The verifier's outputs for steps [start, upto) of hop k, run as one chunk (None: it failed)."""
        steps = tapped[start:upto]
        inputs = torch.cat([s.inputs[k] for s in steps], dim=1)
        mask = torch.cat([s.mask for s in steps], dim=1)
        self.stats["steps_rerun"] += len(steps)
        self.stats["tokens_rerun"] += inputs.shape[0] * inputs.shape[1]
        try:
            return await verifier.step(inputs, mask)
        except InferenceError as exc:
            logger.info("spot check: verifier %s failed: %s", verifier.route[0].peer_id, exc)
            return None

    @staticmethod
    def _first_disagreement(got: torch.Tensor, tapped: list[TappedStep], k: int, start: int, verified: int,
                            upto: int) -> int | None:
        """The first step in [verified, upto) where hop k's output disagrees with `got`, a re-run of
        steps [start, upto)."""
        for index in range(verified, upto):
            if _disagree(_segment(got, tapped, start, upto, index), tapped[index], k):
                return index
        return None

    async def _settle_dispute(self, session, k: int, audit: HopAudit, bad: int, verifier_said: torch.Tensor) -> None:
        """Hop k and its verifier disagree at step `bad`: a third peer replays steps [0, bad] and
        the two that agree are right. A lying hop raises LiarDetected; a lying verifier is banned
        and replaced, and the audit goes on."""
        hop, tapped = session.route[k], session.tapped
        verifier_id = audit.verifier.route[0].peer_id
        self.stats["third_opinions"] += 1
        judge = await self.open_verifier(hop.start, hop.end, self._excluded(hop.peer_id, verifier_id), True)
        opinion = None
        if judge is not None:
            try:
                opinion = await self._rerun(judge, tapped, k, 0, bad + 1)
            finally:
                await judge.close(wait=False)
        self.stats["lies_caught"] += 1
        if opinion is None:
            raise LiarDetected(f"hop {k} ({hop.peer_id}) and verifier {verifier_id} disagree at step {bad} and "
                               f"no third peer could decide", {hop.peer_id, verifier_id}, bad, proven=False)
        judged = _segment(opinion, tapped, 0, bad + 1, bad)
        judge_vs_hop = _disagree(judged, tapped[bad], k)
        judge_vs_verifier = _disagree(judged, tapped[bad], k, claimed=verifier_said)
        if judge_vs_hop and judge_vs_verifier:
            judge_id = judge.route[0].peer_id
            raise LiarDetected(f"hop {k} ({hop.peer_id}), verifier {verifier_id} and judge {judge_id} all disagree "
                               f"at step {bad}", {hop.peer_id, verifier_id, judge_id}, bad, proven=False)
        if judge_vs_hop:
            raise LiarDetected(f"hop {k} ({hop.peer_id}) answered wrong hidden states at step {bad} (a verifier "
                               f"and a third peer agree)", {hop.peer_id}, bad, proven=True)
        logger.warning("spot check: verifier %s lied about blocks [%d, %d) (the hop and a third peer agree); "
                       "banned", verifier_id, hop.start, hop.end)
        self.ban_liar(verifier_id)
        await audit.verifier.close(wait=False)
        audit.verifier, audit.verifier_steps = None, 0
        audit.verified = bad + 1
