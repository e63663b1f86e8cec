"""The volunteer node: host a span, announce it, serve sessions until told to leave.

Life of a peer: load the span (progress bar) -> measure its throughput -> start the libp2p host
and the DHT -> bootstrap -> (no --blocks: choose and load the span now, see rebalancer.py) -> register handlers -> announce (signed record, re-announced every
ANNOUNCE_INTERVAL) -> write the ready file -> serve. SIGINT/SIGTERM: stop taking sessions,
withdraw the record, give open sessions a short grace to finish, close the host, exit 0.
"""

from __future__ import annotations

import logging
import signal
import statistics
import time
from functools import partial
from dataclasses import dataclass, field
from pathlib import Path

import torch
import trio

from molink.crypto.identity import Identity
from molink.crypto.swarm_key import SwarmKey
from molink.dht.direct import DIRECT_PROTOCOL, tcp_ip_of
from molink.dht.host import p2p_addrs, running_host, set_protocol_handler
from molink.dht.holepunch import PunchingDirectListener
from molink.dht.kademlia import SwarmDHT
from molink.dht.nat import NatConfig, NatService
from molink.dht.records import MAX_PREFILL_SECONDS, SpanRecord
from molink.dht.streams import framed_handler
from molink.peer import protocol as p
from molink.peer.bootstrap_node import SIGNALS, write_ready_file
from molink.peer.cost_curve import Line, PrefillCost, measure_prefill
from molink.peer.handler import InferenceHandler
from molink.peer.machine import device_name, machine_cores, machine_id
from molink.peer.memory_cache import SessionRegistry
from molink.peer.model_key import model_key_for
from molink.peer.neighbours import NeighbourProber, probe_interval_from_env
from molink.peer.session_limits import OPEN_MAX_QUEUED_BYTES, OPEN_WIRE_LIMITS, SessionLimits
from molink.peer.rebalancer import REBALANCE_INTERVAL, AutoPlan, Rebalancer, join_span, plan_auto_span
from molink.peer.scheduler import BatchingConfig
from molink.peer.span import SpanModel

logger = logging.getLogger("molink.peer")

VERSION = "molink/0.1.0"
ANNOUNCE_INTERVAL = 30.0
RECORD_TTL = 120.0
STATUS_INTERVAL = 60.0
LEAVE_GRACE = 3.0


@dataclass
class PeerConfig:
    model_dir: Path
    start: int | None  # None (with end None): choose the span at join time and rebalance it later
    end: int | None
    identity: Identity
    initial_peers: list[str] = field(default_factory=list)
    listen: list[str] = field(default_factory=lambda: ["/ip4/127.0.0.1/tcp/0"])
    dtype: torch.dtype | None = None
    device: str = "cpu"
    cache_tokens: int | None = None
    max_cache_bytes: int = 1 << 30
    idle_timeout: float = 300.0
    ready_file: str | None = None
    model_name: str | None = None
    throughput: float | None = None  # measured at start when None
    num_blocks: int | None = None  # auto span: force this many blocks (default: memory and speed decide)
    max_memory_bytes: int | None = None  # auto span: memory to fill (default: the device's free memory)
    rebalance_interval: float = REBALANCE_INTERVAL  # auto span: seconds between checks (0: never move)
    batching: BatchingConfig = field(default_factory=BatchingConfig.from_env)  # scheduler.py
    direct_port: int | None = 0  # direct data channels (dht/direct.py): 0 = any free port, None = off
    probe_interval: float = field(default_factory=probe_interval_from_env)  # neighbours.py: next-hop RTTs (0: off)
    metrics_port: int | None = None  # Prometheus /metrics on the listen IP (metrics.py); None: off
    nat: NatConfig = field(default_factory=NatConfig)  # reachability, relays, hole punching (dht/nat.py)
    swarm_key: SwarmKey | None = None  # private swarm: only holders of this key connect (dht/private_swarm.py)
    session_limits: SessionLimits = field(default_factory=SessionLimits)  # per-client/session caps


def measure_throughput(span: SpanModel, steps: int = 24) -> float:
    """Block-forwards per second for one decode token at batch 1 (SpanRecord.throughput's unit).

    The median step, not the mean: on a shared machine a few slow steps (another process
    waking up) would otherwise make identical peers announce throughputs 3x apart.
    """
    session = span.new_session(span.start, span.start + 1)
    hidden = torch.zeros(1, 1, span.config.hidden_size, dtype=span.dtype)
    one = torch.ones(1, 1, dtype=torch.long)
    span.step(session, hidden, one)  # warm-up
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        span.step(session, hidden, one)
        times.append(time.perf_counter() - started)
    return 1.0 / max(statistics.median(times), 1e-9)


def _announced(line: Line | None) -> tuple[float, float] | None:
    """A prefill line as the record carries it (bounded, as records are checked)."""
    if line is None:
        return None
    return tuple(min(MAX_PREFILL_SECONDS, max(0.0, x)) for x in (line.fixed, line.per_row))


def measure_prefill_cost(span: SpanModel) -> PrefillCost:
    """What prompt chunks cost on this span, per block (the first guess of PrefillCost). Through the
    whole span, not one block: part of a forward's fixed cost is paid once per forward (masks, the
    rotary table), and one block times the span's blocks overstated SmolLM2's fixed cost ~1.7x."""
    hidden_size, dtype, blocks = span.config.hidden_size, span.dtype, span.end - span.start

    def run_chunk(tokens: int) -> None:
        session = span.new_session()
        span.step(session, torch.zeros(1, tokens, hidden_size, dtype=dtype), torch.ones(1, tokens, dtype=torch.long))
        session.close()

    return PrefillCost([(tokens, seconds / blocks) for tokens, seconds in measure_prefill(run_chunk)])


class PeerServer:
    def __init__(self, config: PeerConfig, span: SpanModel | None, model_key: str, throughput: float,
                 plan: AutoPlan | None = None):
        self.config = config
        self.span = span  # None until serve() has chosen one (auto span: `plan` says what fits)
        self.plan = plan
        self.model_key = model_key
        self.throughput = throughput
        limits = config.session_limits
        self.registry = SessionRegistry(self._cache_budget() if span is not None else 0, limits.max_sessions,
                                        max_sessions_per_client=limits.max_sessions_per_client,
                                        max_session_tokens=limits.max_session_tokens)
        self.handler: InferenceHandler | None = None
        self.addrs: list[str] = []
        self.neighbours: NeighbourProber | None = None  # RTTs to our next hops, for the record
        self.nat: NatService | None = None  # decides whether records list our addresses or relayed ones

    def _cache_budget(self) -> int:
        return self.config.cache_tokens or max(1, self.config.max_cache_bytes // self.span.kv_bytes_per_token())

    @classmethod
    def load(cls, config: PeerConfig) -> "PeerServer":
        model_key = model_key_for(config.model_dir, config.model_name)
        if config.start is None:  # the span is chosen once we can see the swarm (serve)
            plan, throughput = plan_auto_span(config, measure_throughput)
            logger.info("auto span: %.0f block-steps/s, model key %s", throughput, model_key)
            return cls(config, None, model_key, throughput, plan)
        span = SpanModel.load(config.model_dir, config.start, config.end, dtype=config.dtype, device=config.device)
        throughput = config.throughput or measure_throughput(span)
        logger.info("serving blocks [%d, %d) of %s: %.0f block-steps/s, model key %s",
                    config.start, config.end, config.model_dir, throughput, model_key)
        return cls(config, span, model_key, throughput)

    def record(self) -> SpanRecord | None:
        if self.handler is None or self.handler.leaving:
            return None
        # Load is the number of open sessions: a queue length changes per token and would be stale
        # long before a client read it from a record re-announced every 30 s.
        # What ONE new session can get: a per-session cap lowers it, so routers do not pick us for more.
        free = min(self.registry.free_tokens, self.config.session_limits.max_session_tokens or self.registry.free_tokens)
        addrs = self.nat.announce_addrs(self.addrs) if self.nat is not None else self.addrs
        return SpanRecord.create(self.config.identity, self.model_key, self.span.start, self.span.end, addrs,
                                 self.throughput, free, VERSION, ttl=RECORD_TTL,
                                 sessions=len(self.registry),
                                 next_rtts=self.neighbours.published() if self.neighbours else None,
                                 reachability=self.nat.status if self.nat is not None else "unknown",
                                 prefill_cost=_announced(self.handler.prefill_cost.line()),
                                 machine=machine_id(self.model_key, device_name(self.config.device)),
                                 machine_cores=machine_cores(self.config.device))

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        async with running_host(self.config.identity.keypair, self.config.listen,
                                swarm_key=self.config.swarm_key) as host:
            self.addrs = [str(a).split("/p2p/")[0] for a in p2p_addrs(host)]
            dht = SwarmDHT(host, self.config.identity)
            async with dht.running():
                await dht.bootstrap(self.config.initial_peers)
                if self.span is None:
                    self.span = await join_span(self, dht)
                    self.registry.budget_tokens = self._cache_budget()
                prefill_cost = measure_prefill_cost(self.span)
                self.handler = handler = InferenceHandler(self.span, self.model_key, self.registry, host,
                                                          idle_timeout=self.config.idle_timeout,
                                                          throughput=self.throughput, batching=self.config.batching,
                                                          limits=self.config.session_limits, prefill_cost=prefill_cost)
                data_handlers = {
                    # small frames until a session exists; the handler then raises them to its need
                    p.INFERENCE_PROTOCOL: framed_handler(handler.handle_inference, limits=OPEN_WIRE_LIMITS,
                                                         max_queued_bytes=OPEN_MAX_QUEUED_BYTES,
                                                         receive_timeout=self.config.idle_timeout),
                    p.PUSH_PROTOCOL: framed_handler(handler.handle_push, limits=p.PEER_WIRE_LIMITS),
                }
                for protocol_id, stream_handler in data_handlers.items():
                    set_protocol_handler(host, protocol_id, stream_handler)
                set_protocol_handler(host, p.INFO_PROTOCOL, framed_handler(handler.handle_info))
                async with trio.open_nursery() as nursery:
                    await nursery.start(handler.run_workers)
                    await self._start_direct_channels(host, data_handlers, nursery)
                    if self.config.metrics_port is not None:
                        from molink.peer.metrics import serve_metrics

                        await nursery.start(serve_metrics, self, tcp_ip_of(self.config.listen) or "127.0.0.1",
                                            self.config.metrics_port)
                    self.nat = NatService(host, self.config.initial_peers, self.config.nat,
                                          on_change=partial(self._announce_now, dht))
                    await nursery.start(self.nat.run)  # before the first announce: it picks the addresses
                    await nursery.start(partial(dht.run_announcer, self.record, ANNOUNCE_INTERVAL, ttl=RECORD_TTL))
                    if self.config.probe_interval > 0:
                        self.neighbours = NeighbourProber(
                            host, dht, self.model_key, lambda: (self.span.start, self.span.end),
                            self.span.config.num_hidden_layers, interval=self.config.probe_interval,
                            record=self.record)
                        await nursery.start(self.neighbours.run)
                    full_addr = str(p2p_addrs(host)[0])
                    logger.info("peer %s ready at %s", host.get_id().to_base58(), full_addr)
                    if self.config.ready_file:
                        write_ready_file(self.config.ready_file, full_addr)
                    nursery.start_soon(self._status_log)
                    if self.plan is not None and self.config.rebalance_interval > 0:
                        await nursery.start(Rebalancer(self, dht, self.config.rebalance_interval).run)
                    task_status.started(full_addr)
                    # The receiver stays open through the leave: a second Ctrl-C / SIGTERM
                    # must not kill the peer half-way through withdrawing.
                    with trio.open_signal_receiver(*SIGNALS) as signals:
                        async for signum in signals:
                            logger.info("got %s: leaving the swarm", signal.Signals(signum).name)
                            break
                        await self._leave(dht)
                    nursery.cancel_scope.cancel()
        logger.info("peer stopped")

    async def _start_direct_channels(self, host, data_handlers: dict, nursery: trio.Nursery) -> None:
        """Offer the hot path on a plain TCP port as well (dht/direct.py), keyed over libp2p."""
        bind_ip = tcp_ip_of(self.config.listen)
        if self.config.direct_port is None or bind_ip is None:
            logger.info("direct data channels off: sessions use libp2p streams")
            return
        # Also punches holes towards dialers that reach us through a relay (dht/holepunch.py).
        listener = PunchingDirectListener(data_handlers, bind_ip, self.config.direct_port, host=host)
        await nursery.start(listener.run)
        set_protocol_handler(host, DIRECT_PROTOCOL, framed_handler(listener.handle_ticket_request))

    async def _announce_now(self, dht: SwarmDHT) -> None:
        """Our addresses changed (a relay came or went): tell the swarm now, not in 30 s."""
        record = self.record()
        if record is None:
            return
        with trio.move_on_after(10):
            try:
                await dht.announce(record)
                logger.info("re-announced at %s", ", ".join(record.addrs))
            except Exception as exc:
                logger.info("re-announcing after an address change failed (the periodic announce retries): %s",
                            exc)

    async def _leave(self, dht: SwarmDHT) -> None:
        self.handler.leaving = True
        with trio.move_on_after(5) as scope:
            try:
                await dht.withdraw(self.model_key, version=VERSION, ttl=RECORD_TTL)
            except Exception as exc:
                logger.warning("could not withdraw the span record: %s", exc)
        if scope.cancelled_caught:
            logger.warning("withdrawing the span record took over 5 s; it expires within %.0f s anyway", RECORD_TTL)
        with trio.move_on_after(LEAVE_GRACE):  # let steps in flight finish
            while any(time.monotonic() - s.last_used < 1.0 for s in self.registry.sessions.values()):
                await trio.sleep(0.1)
        if self.registry.sessions:
            logger.info("closing %d open session(s)", len(self.registry))

    async def _status_log(self) -> None:
        while True:
            await trio.sleep(STATUS_INTERVAL)
            stats = self.handler.stats
            logger.info("status: blocks [%d, %d), %d session(s) open, %d steps / %d tokens served, "
                        "cache %d/%d tokens free, %d error(s)", self.span.start, self.span.end, len(self.registry),
                        stats.steps, stats.tokens, self.registry.free_tokens, self.registry.budget_tokens,
                        stats.errors)
            if self.nat is not None:
                logger.info("status: %s", self.nat.describe())
