"""`DistributedModelForCausalLM`: the model, with its blocks served by the swarm.

    from molink.swarm import DistributedModelForCausalLM
    with DistributedModelForCausalLM.from_pretrained(path_or_id, initial_peers=[...]) as model:
        out = model.generate(input_ids, max_new_tokens=32)

Only the client-side pieces load here. A background trio loop (molink.swarm.loop) runs a libp2p
host and a DHT client; each generation finds the model's spans in the DHT, builds a route and
opens a RemoteSession along it. `close()` stops the loop: no threads or sockets stay behind.
"""

from __future__ import annotations

import logging
import os
import random
import time
from collections import Counter
from pathlib import Path

import torch
import trio
from libp2p.kad_dht.kad_dht import DHTMode

from molink.crypto.identity import Identity, load_or_create_identity
from molink.crypto.swarm_key import SwarmKey, swarm_key_from
from molink.dht.codec_policy import DEFAULT_COMPRESSION, check_compression
from molink.dht.holepunch import data_paths
from molink.dht.host import ConnectError, connect_peer, running_host, with_peer_id
from molink.dht.kademlia import SwarmDHT
from molink.dht.records import SpanRecord
from molink.peer.checkpoint import resolve_model_dir
from molink.peer.model_key import model_key_for
from molink.swarm.inference_errors import InferenceError
from molink.swarm.inference_session import CONNECT_TIMEOUT, RemoteSession
from molink.swarm.loop import BackgroundLoop
from molink.swarm.model import SwarmModelBase
from molink.swarm.failover import DEFAULT_RECOVERY_TIMEOUT, FailoverChain
from molink.swarm.routing import BanList, NoRouteError, RouteHop, make_route
from molink.swarm.channel_pool import ChannelPool
from molink.swarm.cohorts import CohortGate, cohorts_enabled
from molink.swarm.pipeline_cost import MAX_MICRO_BATCHES, PipelineCosts, choose_micro_batches, route_costs
from molink.swarm.prefill_plan import PrefillPlanner
from molink.swarm.step_bundles import StepBundles, bundles_enabled
from molink.swarm.spot_check import Auditor, SpotCheckConfig

logger = logging.getLogger(__name__)

BOOTSTRAP_TIMEOUT = 15.0
RECORDS_REFRESH_SECONDS = 15.0
LOOKUP_TIMEOUT = 5.0
VERIFIER_TRIES = 3  # candidates tried per lookup before saying nobody can check a hop
VERIFIER_LOOKUP_AFTER = 5.0  # seconds: records younger than this are trusted to list every verifier


class DistributedModelForCausalLM(SwarmModelBase):
    def __init__(self, model_dir: Path, initial_peers: list[str], dtype: torch.dtype = torch.float32,
                 relay: bool = False, identity: Identity | None = None, model_name: str | None = None,
                 recovery_timeout: float = DEFAULT_RECOVERY_TIMEOUT, direct: bool = True,
                 spot_check: SpotCheckConfig | float | None = None, compression: str = DEFAULT_COMPRESSION,
                 swarm_key: SwarmKey | str | os.PathLike | None = None):
        super().__init__(model_dir, dtype)
        if not initial_peers:
            raise ValueError("initial_peers is empty: give at least one bootstrap multiaddr")
        self.initial_peers = list(initial_peers)
        self.relay = relay
        self.direct = direct  # hot path on direct channels where peers offer them (molink.dht.direct)
        self.model_key = model_key_for(model_dir, model_name)
        self.identity = identity or Identity.generate()
        # a private swarm's key (or its file): without it no node of that swarm will talk to us
        self.swarm_key = swarm_key_from(swarm_key)
        self.last_route: list[RouteHop] = []
        self.bans = BanList()
        self.rtts: dict[str, float] = {}
        self.active_sessions: Counter[str] = Counter()
        self.recovery_timeout = recovery_timeout
        # re-run a fraction of hops on other peers and catch liars (swarm/spot_check.py); 0 = off
        self.spot_check = SpotCheckConfig.of(spot_check)
        self._spot_rng: random.Random | None = None  # which hops to audit: one stream for all generations
        self._spot_rng_config: SpotCheckConfig | None = None
        # hidden states' codec on every link of our sessions: "auto" (by link, lossless), "raw", "zstd",
        # or the lossy "q8" (molink.dht.codec_policy; its effect on tokens is measured in README)
        self.compression = check_compression(compression)
        if self.compression == "q8" and self.spot_check.rate > 0:
            # audits compare hops within fp tolerances far below q8's rounding: honest peers would be banned
            if spot_check is not None:
                raise ValueError("compression='q8' cannot be combined with spot checks (yet)")
            logger.warning("compression='q8': spot checks are off (their tolerances are below q8's rounding)")
            self.spot_check = SpotCheckConfig(rate=0.0)
        self.last_chain: FailoverChain | None = None
        self._records: list[SpanRecord] = []
        self._unreachable: dict[str, int] = {}  # peer id -> seq of the record that could not be dialled
        self._records_at = -float("inf")
        self._refreshing: trio.Event | None = None
        self._shutdown: trio.Event | None = None
        self._loop = BackgroundLoop()
        # streams of sessions that closed cleanly, warm for the next session to the same peer
        self.channel_pool = ChannelPool(lambda: self._loop.nursery)
        # concurrent generations' decode steps share frames hop to hop (swarm/step_bundles.py)
        # ... and gather into a few cohorts that step together (swarm/cohorts.py)
        gate = CohortGate(self._cohort_count) if cohorts_enabled() else None
        self.step_bundles = StepBundles(gate) if bundles_enabled() else None
        # prompts travel in chunks sized by the route, as measured (swarm/prefill_plan.py)
        self.prefill_planner = PrefillPlanner(self._route_costs)
        try:
            self.host, self.dht = self._loop.call(self._loop.nursery.start, self._network)
        except BaseException:
            self._loop.close()
            raise

    @classmethod
    def from_pretrained(cls, path_or_id: str | Path, initial_peers: list[str], *, dtype: torch.dtype = torch.float32,
                        relay: bool = False, identity_path: str | None = None,
                        model_name: str | None = None,
                        recovery_timeout: float = DEFAULT_RECOVERY_TIMEOUT,
                        direct: bool = True,
                        spot_check: SpotCheckConfig | float | None = None,
                        compression: str = DEFAULT_COMPRESSION,
                        swarm_key: SwarmKey | str | os.PathLike | None = None) -> "DistributedModelForCausalLM":
        identity = load_or_create_identity(identity_path) if identity_path else None
        return cls(resolve_model_dir(path_or_id), initial_peers, dtype, relay, identity, model_name,
                   recovery_timeout, direct, spot_check, compression, swarm_key=swarm_key)

    async def _network(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        self._shutdown = trio.Event()
        async with running_host(self.identity.keypair, ["/ip4/127.0.0.1/tcp/0"], swarm_key=self.swarm_key) as host:
            # client mode: a researcher's laptop (often behind NAT) must not become a DHT server
            dht = SwarmDHT(host, self.identity, mode=DHTMode.CLIENT)
            dht.unresponsive = lambda peer_id: peer_id.to_base58() in self.bans.struck()
            async with dht.running():
                joined = await dht.bootstrap(self.initial_peers, timeout=BOOTSTRAP_TIMEOUT)
                if joined == 0:
                    raise ConnectionError(f"none of the initial peers answered: {self.initial_peers}")
                self.dht = dht
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._keep_records_fresh)
                    task_status.started((host, dht))
                    await self._shutdown.wait()
                    nursery.cancel_scope.cancel()

    def find_spans(self) -> list[SpanRecord]:
        """The model's live span records, looked up in the DHT now."""
        self._loop.call(self._refresh_records)
        return list(self._records)

    async def open_chain(self, batch_size: int, max_length: int) -> FailoverChain:
        async def open_session(banned: set[str]) -> RemoteSession:
            return await self.open_session(batch_size, max_length, banned)

        async def open_verifier(start: int, end: int, exclude: set[str], urgent: bool) -> RemoteSession | None:
            return await self.open_verifier(start, end, exclude, batch_size, max_length, urgent)

        auditor = None
        if self.spot_check.rate > 0:
            if self._spot_rng is None or self._spot_rng_config is not self.spot_check:
                self._spot_rng, self._spot_rng_config = random.Random(self.spot_check.seed), self.spot_check
            auditor = Auditor(self.spot_check, open_verifier, struck=self.bans.struck, ban_liar=self.bans.ban_liar,
                              rng=self._spot_rng)
        self.last_chain = FailoverChain(open_session, self.bans, self.recovery_timeout, has_moved=self._has_moved,
                                        pipelined=not self.relay, auditor=auditor, planner=self.prefill_planner)
        return self.last_chain

    async def open_verifier(self, start: int, end: int, exclude: set[str], batch_size: int,
                            max_length: int, urgent: bool = False) -> RemoteSession | None:
        """A one-hop session on a peer serving blocks [start, end), not in `exclude`, for spot
        checks; refreshes the records once if none is known; None when nobody else serves them."""
        for attempt in range(2):
            candidates = [r for r in self._records if r.start <= start and end <= r.end and not r.is_withdrawal
                          and r.peer_id not in exclude and self._unreachable.get(r.peer_id) != r.seq]
            random.shuffle(candidates)  # a liar must not be able to predict who checks it
            for record in candidates[:VERIFIER_TRIES]:
                session = RemoteSession(self.host, [RouteHop(record, start, end)], self.model_key, batch_size,
                                        max_length, self.config.hidden_size, relay=True, direct=self.direct,
                                        pool=self.channel_pool)
                try:
                    await self._loop.nursery.start(session.run)
                    return session
                except InferenceError as exc:
                    logger.info("spot check: verifier %s unavailable: %s", record.peer_id, exc)
                    if exc.unreachable:  # a dead peer's record: not again until it re-announces
                        self._unreachable[record.peer_id] = record.seq
            if attempt == 0 and (urgent or time.monotonic() - self._records_at > VERIFIER_LOOKUP_AFTER):
                with trio.move_on_after(LOOKUP_TIMEOUT):
                    await self._refresh_records()
        return None

    @property
    def last_recoveries(self) -> list[dict]:
        """What failed during the last generation and how long each recovery took."""
        return list(self.last_chain.recoveries) if self.last_chain else []

    @property
    def last_lies(self) -> list[dict]:
        """Peers caught lying by spot checks during the last generation (see swarm/spot_check.py)."""
        return list(self.last_chain.lies) if self.last_chain else []

    @property
    def last_spot_checks(self) -> dict:
        """The last generation's audit counters: audits, steps and tokens re-run, third opinions."""
        auditor = self.last_chain.auditor if self.last_chain else None
        return dict(auditor.stats) if auditor else {}

    async def _has_moved(self, peer_id: str) -> bool:
        """Did the peer re-announce itself at other addresses (restart on a new port)? Updates the cache."""
        with trio.move_on_after(LOOKUP_TIMEOUT):
            fresh = await self.dht.find_record(self.model_key, peer_id)
            old = next((r for r in self._records if r.peer_id == peer_id), None)
            if fresh is None or fresh.is_withdrawal:
                # gone for good: stop offering it to new routes until a lookup finds it again
                self._records = [r for r in self._records if r.peer_id != peer_id]
                return False
            if old is None or fresh.addrs == old.addrs:
                # unreachable at the address it still announces: dead or frozen. Skip this very
                # record until the peer re-announces (a live peer does so every 30 s).
                self._unreachable[peer_id] = fresh.seq
                return False
            self._records = [fresh if r.peer_id == peer_id else r for r in self._records]
            return True
        return False

    async def open_session(self, batch_size: int, max_length: int, banned: set[str] = frozenset()) -> RemoteSession:
        """A session on the cheapest route the swarm offers now (see molink.swarm.routing)."""
        route = None
        if self._records:
            # Re-routing after a failure must not wait on a DHT lookup (a frozen peer may be one
            # of the DHT's contacts and cost a 5 s RPC timeout): the records refreshed in the
            # background, minus the banned peers, usually suffice.
            try:
                route = await self._reachable_route(batch_size, max_length, banned)
            except NoRouteError:
                route = None
        if route is None:
            with trio.move_on_after(LOOKUP_TIMEOUT):  # the failover loop retries; never hang here
                await self._refresh_records()
            route = await self._reachable_route(batch_size, max_length, banned)
        self.last_route = route
        session = RemoteSession(self.host, route, self.model_key, batch_size, max_length,
                                self.config.hidden_size, relay=self.relay, on_closed=self._session_closed,
                                direct=self.direct, tap=self.spot_check.rate > 0, compression=self.compression,
                                pool=self.channel_pool, bundles=self.step_bundles)
        self.active_sessions.update(hop.peer_id for hop in route)
        try:
            await self._loop.nursery.start(session.run)
        except BaseException:
            self._session_closed(session)
            raise
        return session

    async def planned_route(self, batch_size: int, max_length: int) -> list[RouteHop] | None:
        """The route a session of this shape would take now, opening nothing (sizes micro-batches,
        swarm/micro_batches.py); None when no route is known."""
        if not self._records:
            with trio.move_on_after(LOOKUP_TIMEOUT):
                await self._refresh_records()
        try:
            return self._plan(self._records, batch_size, max_length, self.bans.banned())
        except NoRouteError:
            return None

    async def _refresh_records(self) -> None:
        if self._refreshing is not None:  # one lookup at a time: 64 sessions opening at once share it
            await self._refreshing.wait()
            return
        self._refreshing = trio.Event()
        try:
            self._records = await self.dht.find_spans(self.model_key)
            self._records_at = time.monotonic()
        finally:
            self._refreshing.set()
            self._refreshing = None

    async def _keep_records_fresh(self) -> None:
        while True:
            await trio.sleep(max(0.5, self._records_at + RECORDS_REFRESH_SECONDS - time.monotonic()))
            if time.monotonic() - self._records_at >= RECORDS_REFRESH_SECONDS:
                try:
                    await self._refresh_records()
                except Exception as exc:  # a flaky lookup must not kill the client
                    logger.info("span lookup failed: %s", exc)

    async def _reachable_route(self, batch_size: int, max_length: int, banned: set[str]) -> list[RouteHop]:
        """The cheapest route whose peers all take a connection: plan, dial the route's peers (all
        at once), skip the records of those that refuse, plan again.

        A killed peer's record stays in the DHT until it expires (minutes): planned one session
        open at a time, each dead record cost a failed open plus a DHT lookup (seconds, slower
        still when dead peers are among the DHT's contacts) before the next candidate was tried.
        Each round here marks at least one record, so it ends with a route or NoRouteError."""
        while True:
            route = self._plan(self._records, batch_size, max_length, banned)
            refused = await self._dial_new_hops(route)
            if not refused:
                return route
            for hop in refused:
                logger.info("peer %s does not take connections at %s: routing around it until it re-announces",
                            hop.peer_id, ", ".join(hop.record.addrs[:2]))
                self._unreachable[hop.peer_id] = hop.record.seq

    async def _dial_new_hops(self, route: list[RouteHop]) -> list[RouteHop]:
        """Connect to the route's peers side by side (at once for those we are connected to
        already); return the hops of those that refused."""
        refused: list[RouteHop] = []

        async def dial(hop: RouteHop) -> None:
            try:
                await connect_peer(self.host, with_peer_id(hop.record.addrs, hop.peer_id), timeout=CONNECT_TIMEOUT)
            except ConnectError:
                refused.append(hop)

        async with trio.open_nursery() as nursery:
            for hop in {hop.peer_id: hop for hop in route}.values():  # a peer on two hops: one dial
                nursery.start_soon(dial, hop)
        return refused

    def _plan(self, records, batch_size: int, max_length: int, banned: set[str]) -> list[RouteHop]:
        records = [r for r in records if self._unreachable.get(r.peer_id) != r.seq]
        # rtts: our own heartbeat round trips (first and last hop; fallback for pairs whose first
        # peer published none); relay: every hop is then a round trip of ours (routing.py)
        # punched: NATed peers our data channels reach directly after all (dht/holepunch.py)
        punched = {peer for peer, path in data_paths(self.host).items() if path == "punched"}
        return make_route(records, self.config.num_hidden_layers, banned=banned, rtts=self.rtts,
                          load=self.active_sessions, min_free_tokens=batch_size * max_length, relay=self.relay,
                          punched=punched)

    def _cohort_count(self, session: RemoteSession, decoding: int) -> int:
        """How many cohorts `decoding` sessions on this session's route should form: the micro-batch
        rule for a batch of that many rows (swarm/pipeline_cost.py)."""
        return choose_micro_batches(self._route_costs(session.route), decoding, max_k=MAX_MICRO_BATCHES)

    def _route_costs(self, route: list[RouteHop], link_speed: float = 1.0, compute_speed: float = 1.0) -> PipelineCosts:
        """What each stage of `route` is predicted to cost (swarm/pipeline_cost.py), with links
        `link_speed` times as fast as `link_rate` says and hops `compute_speed` times as fast as announced."""
        return route_costs(route, hidden_size=self.config.hidden_size,
                           head_seconds=self.head_batcher.step_seconds(1, self.config.hidden_size),
                           rtts=self.rtts, relay=self.relay, link_rate=self.link_rate * link_speed,
                           compute_speed=compute_speed)

    def _session_closed(self, session: RemoteSession) -> None:
        if getattr(session, "_counted_out", False):
            return
        session._counted_out = True
        self.active_sessions.subtract(hop.peer_id for hop in session.route)
        self.rtts.update(session.measured_rtts())

    def _run(self, async_fn, *args):
        if self._loop is None:
            raise RuntimeError("the model is closed")
        try:
            return self._loop.call(async_fn, *args)
        except trio.Cancelled:  # close() from another thread while this call ran
            raise RuntimeError("the model was closed during the call") from None

    def close(self) -> None:
        if self._shutdown is not None and self._loop is not None:
            try:
                trio.from_thread.run_sync(self._shutdown.set, trio_token=self._loop._token)
            except (trio.RunFinishedError, RuntimeError):
                pass
        if self._loop is not None:
            self._loop.close()
            self._loop = None
