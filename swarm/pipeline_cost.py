"""How many micro-batches keep a route busy: MoLink's rule, generalised from two nodes to a route.

One generate call with a batch of B rows can travel the route as k sessions of ~B/k rows, one
behind the other (swarm/micro_batches.py): peer 1 computes micro-batch 2 while peer 2 computes
micro-batch 1. Per token, every micro-batch goes once around the loop

    client head -> link -> peer 1 -> link -> ... -> peer n -> link -> client head

and each stage on it (the client's head, each peer's blocks, each link's bytes) is busy busy(b)
seconds for a micro-batch of b rows. One micro-batch's round takes cycle(b) = sum of every busy
time + the links' one-way delays. With k micro-batches in flight a token of all B rows takes

    period(k) = max(k * max over resources of busy(B/k), cycle(B/k))

either the busiest resource (a machine, a link) is the bottleneck (it never idles: the pipeline is full) or a
micro-batch's own round is (stages wait for it). MoLink (two nodes, the master doing the head,
two transfers t per round) takes the k with (k-2) * compute(B/k) >= 2 * transfer(B/k): exactly
where the first term overtakes the second. When a stage's time is proportional to its rows, the
period falls until that crossing and stays flat after it, so MoLink's k is the smallest k with
the shortest period. We take that k (the shortest period, the smallest k on ties) under a cost
curve closer to real decode steps: flat for the first rows (a step reads every weight once
whatever its rows), then growing (on a CPU, 32 rows cost ~1.9x one row). Where costs are flat
in rows, splitting gains nothing and k = 1.

Stages on one machine share it: a resource in the period is a machine (the client's, with every
peer on loopback or naming it; the machine a peer's record names, shared by every peer naming it,
whatever their addresses; else each other address's peers together) or a link between addresses,
and a machine is busy for max(its longest stage, the sum of its stages / its cores) (links inside
one address count as its work; cores: what the records announce, else a device per peer; the
client's machine os.cpu_count()). Measured with 3 SmolLM2 peers + the client on 2 cores, 32 rows in one call: 267-315 ms
per step whole, 218-226 in 2 micro-batches, 260-290 in 3 or 4 (load ~2); but 359 / 532 / 650 ms
for 1 / 2 / 3 while other jobs kept the load at ~5: the cores we count were not free. The
model being rough (it undercounts what an extra session costs per step), we split only for a
predicted gain of at least MIN_GAIN, and take the smallest k within NEAR_BEST of the best period.

Inputs are what a client knows before it opens anything: each hop's announced throughput
(block-forwards per second, one token at batch 1) and addresses, RTTs (the hops' published
next_rtts, the client's own heartbeats, else routing's DEFAULT_RTT; LOOPBACK_RTT inside one
machine), the head's measured cost
(head_batcher.py), and an assumed link rate (nobody announces bandwidth; `link_rate` overrides it).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

from molink.peer.cost_curve import BLOCKS_CURVE, CostCurve, Line
from molink.peer.machine import machine_id
from molink.swarm.routing import DEFAULT_RTT, MIN_THROUGHPUT, RouteHop

MAX_MICRO_BATCHES = 8
MIN_ROWS = 2  # rows per micro-batch: a one-row session pays a whole step's fixed costs for one token
ASSUMED_LINK_RATE = 12.5e6  # bytes/s (100 Mbit/s): the bytes term when nobody measured the link
BYTES_PER_VALUE = 4  # hidden states travel as float32 unless a codec shrinks them
# Split only when the predicted period is this much shorter than unsplit: extra sessions cost more per
# step than STEP_OVERHEAD says on a busy machine (tiny model, 3 local peers: predicted 27 % faster in
# 2 micro-batches, measured 40 % slower), while real splits predict more (SmolLM2 on 2 cores: 36 %).
MIN_GAIN = 0.30
NEAR_BEST = 0.02  # periods this close to the best count as ties (the smaller k wins)
CLIENT_HOST = "client"
# Per process and step, whatever the rows: frames, encryption, the event loop. Tiny model over 3 local
# peers: 4.4 ms per token for ~2.2 ms of compute, i.e. ~0.5 ms in each of the 4 processes.
STEP_OVERHEAD = 0.0005
LOOPBACK_RTT = 0.0005  # seconds: a round trip between two processes of one machine


# Measured on this project's CI machine, one core per process (median of 8 decode steps): the
# blocks' curve is peer/cost_curve.py's; SmolLM2's lm_head (49152 x 576) 15.6 / 28.1 / 56.8 ms at
# 1 / 8 / 32 rows.
HEAD_CURVE = CostCurve(free_rows=1, rows_per_extra=10)


@dataclass(frozen=True)
class Stage:
    """Work a micro-batch needs per token: seconds for one row, how rows scale it, and the machine
    it runs on (stages of one host compete for it; None: a resource of its own, like a link)."""

    name: str
    seconds: float
    curve: CostCurve
    host: str | None = None
    fixed: float = 0.0  # seconds per step whatever its rows (a process's framing, crypto, scheduling)
    # what a prompt chunk asks of it (prefill_times): "rows" (its tokens), "once" (the client head:
    # one row per prompt, after the last chunk) or "last" (the link back: the last position only)
    prefill: str = "rows"
    link: bool = False  # bytes on a wire (or copied inside a machine), not compute
    # a prompt chunk of n rows costs fixed + chunk.at(n) (the peer's measured prefill line, for all its
    # blocks); None: the decode curve stands in (a peer that announced none)
    chunk: Line | None = None

    def busy(self, rows: float) -> float:
        return self.fixed + self.seconds * self.curve.factor(rows)

    def chunk_busy(self, rows: float) -> float:
        """Seconds for a prompt chunk of `rows` token rows."""
        return self.busy(rows) if self.chunk is None else self.fixed + self.chunk.at(rows)

    def chunk_work(self, rows: float) -> float:
        """What of that grows with the chunk (beyond a step's fixed costs)."""
        return self.chunk_busy(rows) - self.fixed


@dataclass(frozen=True)
class PipelineCosts:
    stages: list[Stage]  # the head, each hop's compute, each link's bytes
    delays: list[float]  # one-way delay of every link a token crosses
    cores: dict[str, int] = field(default_factory=dict)  # per host; absent: one per stage (a device each)

    def cycle(self, rows: float) -> float:
        """One micro-batch's time around the loop for one token."""
        return sum(stage.busy(rows) for stage in self.stages) + sum(self.delays)

    def period(self, batch: int, k: int) -> float:
        """Seconds per token of all `batch` rows travelling as k micro-batches."""
        rows = math.ceil(batch / k)  # the largest micro-batch sets the pace
        return max(k * self.busiest([stage.busy(rows) for stage in self.stages]), self.cycle(rows))

    def busiest(self, times: list[float]) -> float:
        """The bottleneck of one pass whose stages take `times`: the busiest host or link (a host
        runs its stages on its cores: no faster than its longest stage, nor than its total / cores)."""
        return max(max(max(ts for _, ts in pairs), sum(ts for _, ts in pairs) / self.cores.get(host, len(pairs)))
                   for host, pairs in self._by_host(times).items())

    def _by_host(self, times: list[float]) -> dict[object, list[tuple[Stage, float]]]:
        """(stage, its time) per machine; a stage of no machine (a wire) is a resource of its own."""
        on_host: dict[object, list[tuple[Stage, float]]] = {}
        for index, (stage, seconds) in enumerate(zip(self.stages, times)):
            on_host.setdefault(stage.host if stage.host is not None else index, []).append((stage, seconds))
        return on_host

    def mostly_links(self, chunk_tokens: int) -> bool:
        """Do the links carry more of such a chunk's work than the peers compute?"""
        work = {True: 0.0, False: 0.0}
        for stage in self.stages:
            if stage.prefill == "rows":
                work[stage.link] += stage.chunk_work(chunk_tokens)
        return work[True] >= work[False]

    def link_per_row(self) -> float:
        """Seconds per row of a prompt chunk on the slowest link (a wire, or a copy inside a machine:
        both follow the link rate)."""
        return max((stage.seconds for stage in self.stages if stage.link and stage.prefill == "rows"), default=0.0)

    def prefill_times(self, chunk_tokens: int, chunks: int = 2) -> PrefillTimes:
        """What a prompt sent as `chunks` chunks of `chunk_tokens` costs on this route (PrefillTimes)."""
        times = [0.0 if stage.prefill == "once" else stage.busy(1) if stage.prefill == "last"
                 else stage.chunk_busy(chunk_tokens) for stage in self.stages]
        head = sum(stage.busy(1) for stage in self.stages if stage.prefill == "once")
        return PrefillTimes(first=self._contended(times, chunks), bottleneck=self.busiest(times),
                            delays=sum(self.delays), head=head)

    def _contended(self, times: list[float], chunks: int) -> float:
        """One chunk's way around the route while the chunks behind it keep the route busy: a machine
        whose compute stages outnumber its cores runs each of them that much slower meanwhile (3
        peers on 2 cores: 1.5x; measured on loopback, SmolLM2, 1024 tokens in 8: the first back after
        ~550 ms where its stages sum to ~370). A prompt sent whole has the machines to itself.
        (Counting only the stages c chunks can keep busy at once, min(c, stages), made 2 chunks look
        free of contention and 3 not: on loopback it then sent 1024-token prompts in 2 chunks, 25 %
        slower than in 8.)"""
        if chunks <= 1:
            return sum(times)
        total = 0.0
        for host, pairs in self._by_host(times).items():
            computing = sum(1 for stage, seconds in pairs if seconds > 0 and not stage.link)
            share = max(1.0, computing / self.cores.get(host, max(1, computing)))
            total += share * sum(seconds for _, seconds in pairs)
        return total


@dataclass(frozen=True)
class PrefillTimes:
    """A prompt in c chunks of n tokens, sent back to back: the first chunk's answer comes back after
    `first` (every stage's work on one chunk, slowed where the chunks behind it share a machine with
    it) + `delays`; each later one `bottleneck` after the one before (the busiest host or link sets
    the pace of a full pipeline); the head runs once at the end. So the first token takes first +
    delays + (c - 1) x bottleneck + head."""

    first: float
    bottleneck: float
    delays: float
    head: float


LINEAR = CostCurve(free_rows=1, rows_per_extra=1)  # b rows cost b x one row (a link's bytes)


def route_costs(route: list[RouteHop], *, hidden_size: int, head_seconds: float, rtts: dict[str, float],
                relay: bool = False, link_rate: float = ASSUMED_LINK_RATE, bytes_per_value: int = BYTES_PER_VALUE,
                client_cores: int | None = None, compute_speed: float = 1.0) -> PipelineCosts:
    """The stages of a route (see the module doc). head_seconds: the client head for one row;
    client_cores: cores of the client's machine (default: all of this one's), shared with loopback peers;
    compute_speed: the hops compute this many times as fast as they announce."""
    hosts = [host_of(hop) for hop in route]  # by address: which links cross a wire
    machines = [machine_of(hop, host) for hop, host in zip(route, hosts)]  # by machine: who shares cores
    cores = {CLIENT_HOST: client_cores or os.cpu_count() or 1}
    for hop, machine in zip(route, machines):
        if machine != CLIENT_HOST and hop.record.machine_cores:
            cores[machine] = hop.record.machine_cores
    stages = [Stage("client head", head_seconds, HEAD_CURVE, CLIENT_HOST, STEP_OVERHEAD, prefill="once")]
    for hop, host in zip(route, machines):
        blocks = hop.end - hop.start
        announced = hop.record.prefill_cost  # per block: (fixed, per token), measured by the peer
        chunk = Line(blocks * announced[0] / compute_speed, blocks * announced[1] / compute_speed) if announced else None
        stages.append(Stage(f"{hop.peer_id[-6:]} [{hop.start}:{hop.end})",
                            blocks / max(hop.record.throughput, MIN_THROUGHPUT) / compute_speed,
                            BLOCKS_CURVE, host, STEP_OVERHEAD, chunk=chunk))
    client_rtt = [rtts.get(hop.peer_id, DEFAULT_RTT) for hop in route]
    if relay:  # the client carries every hop both ways
        links = [(CLIENT_HOST, host, rtt / 2) for host, rtt in zip(hosts, client_rtt) for _ in (0, 1)]
    else:  # client -> p0 -> ... -> pn -> client
        links = [(CLIENT_HOST, hosts[0], client_rtt[0] / 2)]
        for here, (hop, nxt) in enumerate(zip(route, route[1:])):
            rtt = hop.record.next_rtt_map.get(nxt.peer_id, client_rtt[here + 1])
            links.append((hosts[here], hosts[here + 1], rtt / 2))
        links.append((hosts[-1], CLIENT_HOST, client_rtt[-1] / 2))
    row_bytes = hidden_size * bytes_per_value
    delays = []
    machine_at = dict(zip(hosts, machines)) | {CLIENT_HOST: CLIENT_HOST}
    for i, (a, b, delay) in enumerate(links):
        # Inside one machine there is no wire: its bytes are that machine's work (copies), and what a
        # heartbeat measures there is the machine's own busyness, already counted as its stages' work.
        delays.append(LOOPBACK_RTT / 2 if a == b else delay)
        answer = not relay and i == len(links) - 1  # the last hop answers a prompt chunk with its last position
        stages.append(Stage(f"link {i}", row_bytes / link_rate, LINEAR, machine_at[a] if a == b else None,
                            prefill="last" if answer else "rows", link=True))
    return PipelineCosts(stages, delays, cores)


def machine_of(hop: RouteHop, host: str) -> str:
    """The machine whose cores a hop computes on: the one its record names (peers naming one share
    it, whatever their addresses: separate network namespaces of one box), this client's own when it
    names ours; else its host by address."""
    if not hop.record.machine:
        return host
    if hop.record.machine == machine_id(hop.record.model_key, "cpu"):
        return CLIENT_HOST
    return f"machine {hop.record.machine}"


def host_of(hop: RouteHop) -> str:
    """The machine a hop runs on: its first address's IP; loopback means the client's own."""
    for addr in hop.record.addrs:
        parts = addr.split("/")
        if len(parts) > 2 and parts[1] in ("ip4", "ip6", "dns", "dns4", "dns6"):
            ip = parts[2]
            return CLIENT_HOST if ip.startswith("127.") or ip in ("::1", "localhost") else ip
    return hop.peer_id  # no address we can read: a machine of its own


def choose_micro_batches(costs: PipelineCosts, batch: int, max_k: int = MAX_MICRO_BATCHES,
                         min_rows: int = MIN_ROWS, min_gain: float = MIN_GAIN, near_best: float = NEAR_BEST) -> int:
    """The smallest k in [1, max_k] whose period is within near_best of the shortest, keeping
    >= min_rows rows per micro-batch; 1 unless that beats the unsplit period by min_gain."""
    candidates = range(1, max(1, min(max_k, batch // min_rows)) + 1)
    periods = {k: costs.period(batch, k) for k in candidates}
    best = min(periods.values())
    if best > (1 - min_gain) * periods[1]:
        return 1
    return min(k for k, period in periods.items() if period <= best * (1 + near_best) + 1e-12)
