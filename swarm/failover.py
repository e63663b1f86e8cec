"""A generation that survives peers leaving, dying or freezing mid-way, with identical output.

The chain keeps the history of what it fed the swarm (each step's embeddings and mask). When a
step fails — EOF, reset, a missed heartbeat, a deadline, an error frame — the peer that failed is
banned with backoff, a new route is planned without it (it may split the blocks differently), and
the history is replayed through the new route step by step, with the same step boundaries as the
first time, so the rebuilt KV caches hold exactly the values the lost ones held; then the failed
step runs again. Sampling happens on the client, so the tokens are the ones an undisturbed run
would have produced. If no route covers every block right now (the only replica died), the chain
keeps looking for up to `recovery_timeout` seconds: a peer joining to fill the gap is picked up.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable

import torch
import trio

from molink.peer import protocol as p
from molink.swarm.inference_errors import InferenceError
from molink.swarm.inference_session import RemoteSession
from molink.swarm.prefill_plan import PrefillPlanner, fixed_chunks, planned_chunks_enabled
from molink.swarm.routing import BanList, NoRouteError, is_relayed
from molink.swarm.spot_check import Auditor, LiarDetected

logger = logging.getLogger(__name__)

DEFAULT_RECOVERY_TIMEOUT = 60.0
ROUTE_RETRY_INTERVAL = 0.5
BUSY_BACKOFF = 2.0  # a busy peer is healthy: try the others, come back soon, no strike
RELAY_LOSS_BACKOFF = 2.0  # a NATed peer whose relay left needs ~1-2 s to announce another

OpenSession = Callable[[set[str]], Awaitable[RemoteSession]]
HasMoved = Callable[[str], Awaitable[bool]]


class RollBack(Exception):
    """Outputs from history step `step` on were wrong (a liar was caught and banned): the
    generation must go back to before that step; `FailoverChain.rewind` then replays the rest."""

    def __init__(self, step: int, reason: LiarDetected):
        super().__init__(f"rolling back to step {step}: {reason}")
        self.step = step
        self.reason = reason


class FailoverChain:
    def __init__(self, open_session: OpenSession, bans: BanList,
                 recovery_timeout: float = DEFAULT_RECOVERY_TIMEOUT, has_moved: HasMoved | None = None,
                 pipelined: bool = True, auditor: Auditor | None = None, planner: PrefillPlanner | None = None):
        self.open_session = open_session
        self.has_moved = has_moved  # a peer restarted on a new address is not to be banned
        self.bans = bans
        self.recovery_timeout = recovery_timeout
        self.session: RemoteSession | None = None
        self.history: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.recoveries: list[dict] = []  # what failed, and how long recovery took
        # steps sent back to back travel pipelined (push mode); client-relayed steps would only
        # add round trips, so the generation loop sends a prompt whole then
        self.pipelined = pipelined
        self.auditor = auditor  # spot checks (swarm/spot_check.py), or None
        self.planner = planner  # sizes a prompt's chunks by the route (prefill_plan.py), or None: the fixed rule
        self._opening_failure: tuple[InferenceError, float] | None = None  # from prefill_chunks, for step_many
        self._resting_when_planned: set[str] = set()  # see _reopen
        self.lies: list[dict] = []  # liars caught: who, at which step, proven by a third opinion or not

    trims_outputs = True  # step(..., last_only=True): the last hop sends back the last position only

    async def step(self, hidden_states: torch.Tensor, new_mask: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        return (await self.step_many([(hidden_states, new_mask)], last_only))[0]

    async def prefill_chunks(self, tokens: int) -> list[int]:
        """How a prompt of `tokens` should travel (generation.run_step): sized by the route it will
        take, so the route is opened first (and the history replayed) if it is not open yet."""
        if self.planner is None or not planned_chunks_enabled():
            return fixed_chunks(tokens)
        if self.session is None:
            try:
                await self._reopen(pending=0)
            except NoRouteError as exc:
                raise self._give_up([], exc) from exc
            except InferenceError as exc:  # step_many recovers, counting this failure as its first
                await self._drop_session(exc)
                self._opening_failure = (exc, time.monotonic())
                return fixed_chunks(tokens)
        return self.planner.chunks(self.session.route, tokens, self.session.batch_size)

    async def step_many(self, items: list[tuple[torch.Tensor, torch.Tensor]],
                        last_only: bool = False) -> list[torch.Tensor]:
        """Several consecutive steps sent back to back (a prompt in chunks: the peers pipeline them)."""
        self.history.extend(items)
        failed_at: float | None = None
        failures: list[InferenceError] = []
        if self._opening_failure is not None:  # prefill_chunks failed to open the route for these steps
            (first, failed_at), self._opening_failure = self._opening_failure, None
            failures.append(first)
        while True:
            try:
                if self.session is None:
                    await self._reopen(pending=len(items))
                results = await self.session.step_many(items, last_only)
                self._measured(self.session)
                if self.auditor is not None:
                    await self.auditor.after_steps(self.session)
            except LiarDetected as exc:
                await self._punish(exc)
                raise RollBack(exc.first_bad_step, exc) from exc
            except NoRouteError as exc:
                raise self._give_up(failures, exc) from exc
            except InferenceError as exc:
                failed_at = failed_at or time.monotonic()
                failures.append(exc)
                await self._drop_session(exc)
                if time.monotonic() - failed_at > self.recovery_timeout:
                    raise self._give_up(failures, exc) from exc
                continue
            if failed_at is not None:
                self.recoveries.append({"peer_id": failures[0].peer_id, "error": str(failures[0]),
                                        "errors": [str(f) for f in failures],
                                        "seconds": time.monotonic() - failed_at, "step": len(self.history)})
                logger.info("recovered from %s in %.2f s", failures[0], time.monotonic() - failed_at)
            return results

    def _measured(self, session: RemoteSession) -> None:
        """What the last steps took, for the prefill planner (prefill_plan.py)."""
        timing, session.prompt_timing = session.prompt_timing, None
        if self.planner is not None and timing is not None:
            self.planner.observe(session.route, *timing, batch=session.batch_size)

    def _give_up(self, failures: list[InferenceError], last: Exception) -> InferenceError:
        """The error the caller sees: say "busy" when that is why, not just "no route"."""
        busy = [f for f in failures if f.code == p.BUSY]
        if busy or str(last).startswith("busy") or (isinstance(last, NoRouteError) and self._resting_when_planned):
            reason = busy[-1] if busy else last
            return InferenceError(f"the swarm is busy (no KV-cache room): {reason}", getattr(reason, "peer_id", None),
                                  p.BUSY)
        if isinstance(last, InferenceError):
            return InferenceError(f"could not recover within {self.recovery_timeout:.0f} s: {last}",
                                  last.peer_id, last.code)
        return InferenceError(f"no route through the swarm: {last}")

    async def _reopen(self, pending: int = 1) -> None:
        """Open a session on a fresh route and replay every earlier step (all but the `pending`
        last ones of the history) through it, with the same step boundaries as the first time."""
        deadline = time.monotonic() + self.recovery_timeout
        while True:
            # who was avoided only for being busy when this plan was made: a busy peer's backoff
            # may run out while the plan fails, and the caller must still hear "busy" (_give_up)
            self._resting_when_planned = self.bans.resting()
            try:
                session = await self.open_session(self.bans.banned())
                break
            except NoRouteError:
                if time.monotonic() > deadline:
                    raise
                await trio.sleep(ROUTE_RETRY_INTERVAL)  # wait for a replica or a joining peer
        self.session = session
        if self.auditor is not None:
            self.auditor.attach(session)
        replay = self.history[:-pending] if pending else self.history
        if replay:
            await session.step_many(replay, last_only=True)  # only the peers' caches matter here
            session.prompt_timing = None  # a replay's steps are not a prompt's chunks

    def _reached_through_relay(self, peer_id: str | None) -> bool:
        route = self.session.route if self.session is not None else []
        return any(hop.peer_id == peer_id and is_relayed(hop.record) for hop in route)

    async def _drop_session(self, exc: InferenceError) -> None:
        if exc.unreachable and exc.peer_id and self.has_moved is not None and await self.has_moved(exc.peer_id):
            logger.info("peer %s announced a new address; retrying there", exc.peer_id)
        elif exc.code == p.BUSY and exc.peer_id is not None:
            self.bans.avoid(exc.peer_id, BUSY_BACKOFF)
            logger.info("peer %s is busy; trying others", exc.peer_id)
        elif exc.code is None and self._reached_through_relay(exc.peer_id):
            # Its relay may have left (not the peer's fault): it reserves another and re-announces
            # within seconds. No strike; if the peer itself is gone, the reconnect says so.
            self.bans.avoid(exc.peer_id, RELAY_LOSS_BACKOFF)
            logger.info("relayed peer %s failed (%s); retrying in %.0f s", exc.peer_id, exc, RELAY_LOSS_BACKOFF)
        elif exc.peer_id is not None:
            duration = self.bans.ban(exc.peer_id)
            logger.warning("peer %s failed (%s); banned for %.0f s, re-routing", exc.peer_id, exc, duration)
        else:
            logger.warning("session failed (%s); re-routing", exc)
        await self._forget_session()

    async def _forget_session(self, wait: bool = False) -> None:
        if self.auditor is not None:
            await self.auditor.detach()
        if self.session is not None:
            session, self.session = self.session, None
            await session.close(wait=wait)

    # ------------------------------------------------------------------ spot checks

    async def settle(self) -> None:
        """End of a generation: finish the audits (may raise RollBack, like a step)."""
        if self.auditor is None or self.session is None:
            return
        try:
            await self.auditor.settle(self.session)
        except LiarDetected as exc:
            await self._punish(exc)
            raise RollBack(exc.first_bad_step, exc) from exc

    def rewind(self, steps: int) -> None:
        """Forget history from `steps` on; the next step reopens a route and replays the rest."""
        del self.history[steps:]

    async def _punish(self, exc: LiarDetected) -> None:
        for peer_id in exc.liars:
            if exc.proven:
                self.bans.ban_liar(peer_id)
            else:
                self.bans.ban(peer_id)
            self.lies.append({"peer_id": peer_id, "step": exc.first_bad_step, "proven": exc.proven,
                              "reason": str(exc)})
        logger.warning("spot check: %s; %s %s, rolling back to step %d", exc,
                       "banned" if exc.proven else "avoiding", sorted(exc.liars), exc.first_bad_step)
        await self._forget_session()

    async def close(self) -> None:
        await self._forget_session(wait=True)
