"""Choosing the span at join time and moving it later: the I/O side of `block_selection`.

Join (no --blocks): measure what this peer can do before touching the network — usable memory,
the bytes of a block (from the checkpoint's tensor shapes, in the dtype we will load), the KV
budget, and the throughput of one block — then, once the DHT is up, look at the swarm and load
the window `block_selection` picks.

Rebalance: every ~interval (±30 % random, so peers that joined together do not decide together)
look at the swarm again and move if `rebalance_decision` says so. A move never opens a gap:
- the decision refuses to leave blocks that only we serve;
- the new span is loaded (in a worker thread) while the old one keeps serving;
- before switching we decide AGAIN on a fresh lookup: a peer that moved while we were loading
  is seen, and we abandon instead of following it (this, with the random timing, is what stops
  two identical peers from flapping between the same two windows);
- the switch is one assignment: new sessions open on the new span, open sessions finish on the
  span they started on (ActiveSession.span), the new record is announced at once, and the old
  span is dropped when its last session ends. Then a cooldown of COOLDOWN_INTERVALS intervals.
Blocks shared by the old and new windows are reused, not reloaded: a move costs the memory and
load time of the blocks that differ only.
"""

from __future__ import annotations

import logging
import random
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import psutil  # a dependency of libp2p (via multiaddr)
import torch
import trio
from safetensors import safe_open

from molink.peer.block_selection import (
    RebalanceDecision,
    block_coverage,
    choose_num_blocks,
    choose_window,
    gaps,
    memory_fit,
    rebalance_decision,
)
from molink.peer.checkpoint import Checkpoint
from molink.peer.liveness import LivenessProbe
from molink.peer.span import SpanModel

logger = logging.getLogger("molink.peer.rebalancer")

REBALANCE_INTERVAL = 60.0
# Between rebalance checks, look for coverage holes this often: a hole is an outage for every
# client, a merely unbalanced swarm is not, so holes are filled at once (cooldown or not).
HOLE_CHECK_INTERVAL = 5.0
JITTER = 0.3  # each wait is interval x uniform(1 - JITTER, 1 + JITTER)
COOLDOWN_INTERVALS = 2  # after a move, skip this many intervals: let the swarm see us and settle
LOOKUP_TIMEOUT = 30.0  # one find_spans / announce; a slow DHT skips a check, it never blocks serving
# Free device memory we leave alone: allocator slack, activations, the OS and other programs.
MEMORY_MARGIN_FRACTION = 0.1
MEMORY_MARGIN_BYTES = 256 << 20
DROP_POLL = 0.5
_ELEMENT_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


# ---------------------------------------------------------------------------- measuring ourselves


def usable_memory(device: str, max_memory_bytes: int | None = None) -> int:
    """Bytes this peer may fill: the user's --max-memory as given, else free memory minus a margin."""
    if max_memory_bytes:
        return max_memory_bytes
    dev = torch.device(device)
    if dev.type == "cuda":
        free, _total = torch.cuda.mem_get_info(dev)
    else:
        free = psutil.virtual_memory().available  # CPU (and unified-memory devices)
    return int(free - max(free * MEMORY_MARGIN_FRACTION, MEMORY_MARGIN_BYTES))


def max_block_bytes(model_dir: Path, span: SpanModel) -> int:
    """Bytes of the largest block once loaded in `span.dtype` (floats converted, like SpanModel.load).

    From the checkpoint's headers only (shapes and dtypes, no tensor data). The largest block,
    not block 0: some models have uneven blocks (a dense first layer before MoE ones, ...).
    """
    checkpoint, config, family = Checkpoint.open(model_dir), span.config, span.family
    float_size = torch.empty((), dtype=span.dtype).element_size()
    sizes = []
    for index in range(config.num_hidden_layers):
        by_file: dict[str, list[str]] = defaultdict(list)
        for name in checkpoint.names_with_prefix(family.block_prefix(config, index)):
            by_file[checkpoint.weight_map[name]].append(name)
        total = 0
        for file_name, names in by_file.items():
            with safe_open(Path(model_dir) / file_name, framework="pt") as f:
                for name in names:
                    tensor = f.get_slice(name)
                    kind = tensor.get_dtype()
                    numel = 1
                    for dim in tensor.get_shape():
                        numel *= dim
                    total += numel * (float_size if kind.startswith(("F", "BF")) else _ELEMENT_SIZES.get(kind, 4))
        sizes.append(total)
    return max(sizes)


@dataclass
class AutoPlan:
    """What a peer without --blocks measured about itself before joining."""

    model_blocks: int  # blocks in the model
    fit: int  # blocks that fit in memory with their KV budget
    forced: int | None  # --num-blocks


def plan_auto_span(config, measure_throughput) -> tuple[AutoPlan, float]:
    """Measure ourselves (memory first, then a one-block probe span) -> (plan, throughput)."""
    usable = usable_memory(config.device, config.max_memory_bytes)  # before the probe takes any
    probe = SpanModel.load(config.model_dir, 0, 1, dtype=config.dtype, device=config.device, progress=False)
    throughput = config.throughput or measure_throughput(probe)
    block = max_block_bytes(config.model_dir, probe)
    if config.cache_tokens:  # a per-block token budget: its bytes grow with the span
        kv_per_block, kv_fixed = config.cache_tokens * probe.kv_bytes_per_token(1), 0
    else:  # a byte budget shared by the whole span
        kv_per_block, kv_fixed = 0, config.max_cache_bytes
    fit = memory_fit(usable, block, kv_per_block, kv_fixed)
    logger.info("memory: %.1f MB usable; a block takes %.2f MB, KV %.2f MB per block + %.0f MB: %d block(s) fit",
                usable / 2**20, block / 2**20, kv_per_block / 2**20, kv_fixed / 2**20, fit)
    if fit < 1 and not config.num_blocks:
        raise ValueError(f"not enough memory for one block: {usable / 2**20:.0f} MB usable, a block needs "
                         f"{block / 2**20:.1f} MB plus its KV budget ({kv_per_block / 2**20:.1f} MB/block + "
                         f"{kv_fixed / 2**20:.0f} MB); lower --max-cache-mb / --cache-tokens or raise --max-memory")
    if config.num_blocks and config.num_blocks > fit:
        logger.warning("--num-blocks %d is more than the %d block(s) that fit in memory", config.num_blocks, fit)
    return AutoPlan(probe.config.num_hidden_layers, fit, config.num_blocks), throughput


async def _lookup(dht, model_key: str):
    with trio.move_on_after(LOOKUP_TIMEOUT):
        return await dht.find_spans(model_key)
    logger.warning("span lookup took over %.0f s; deciding without it", LOOKUP_TIMEOUT)
    return None


async def join_span(server, dht) -> SpanModel:
    """Look at the swarm, pick our window (block_selection), load it in a worker thread."""
    plan, config = server.plan, server.config
    records = await _lookup(dht, server.model_key) or []
    # dead peers' records outlive them: fill the holes that really are there
    records = await LivenessProbe(dht.host, dht.host.get_id().to_base58()).live_records(records, plan.model_blocks)
    n = plan.forced or choose_num_blocks(plan.fit, server.throughput, records, plan.model_blocks)
    n = max(1, min(n, plan.model_blocks))
    start, end = choose_window(records, plan.model_blocks, n, server.throughput)
    logger.info("auto span: %d peer(s) in the swarm, taking %d block(s): [%d, %d)", len(records), n, start, end)
    return await trio.to_thread.run_sync(lambda: SpanModel.load(
        config.model_dir, start, end, dtype=config.dtype, device=config.device, progress=False),
        abandon_on_cancel=True)


# ---------------------------------------------------------------------------- moving


def load_moved_span(old: SpanModel, model_dir: Path, start: int, end: int) -> SpanModel:
    """SpanModel [start, end): blocks shared with `old` reused, the others read from the checkpoint."""
    def read(a: int, b: int) -> list:
        if a >= b:
            return []
        return SpanModel.load(model_dir, a, b, dtype=old.dtype, device=old.device, progress=False).blocks

    lo, hi = max(start, old.start), min(end, old.end)
    if lo < hi:
        blocks = read(start, lo) + old.blocks[lo - old.start: hi - old.start] + read(hi, end)
    else:
        blocks = read(start, end)
    return SpanModel(old.config, old.family, start, end, blocks, old.device, old.dtype)


class Rebalancer:
    """Runs inside PeerServer.serve's nursery for peers that chose their own span."""

    def __init__(self, server, dht, interval: float = REBALANCE_INTERVAL, liveness: LivenessProbe | None = None):
        if interval <= 0:
            raise ValueError("rebalance interval must be positive")
        self.server, self.dht, self.interval = server, dht, interval
        self.hole_check_interval = min(HOLE_CHECK_INTERVAL, interval)
        self.liveness = liveness or LivenessProbe(dht.host, dht.host.get_id().to_base58())
        self.moves = 0
        self._cooldown_until = 0.0
        self._nursery: trio.Nursery | None = None

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:  # owns the "drop the old span" waiters
            self._nursery = nursery
            task_status.started()
            next_check = trio.current_time() + self._jittered(self.interval)
            while True:
                await trio.sleep(self._jittered(self.hole_check_interval))
                if self.server.handler.leaving:
                    continue
                try:
                    if await self.hole_seen():
                        await self.check_once()
                    elif trio.current_time() >= next_check:
                        next_check = trio.current_time() + self._jittered(self.interval)
                        if trio.current_time() >= self._cooldown_until:
                            await self.check_once()
                except Exception:  # a failed check must not take the peer down: try next time
                    logger.warning("rebalance check failed", exc_info=True)

    @staticmethod
    def _jittered(seconds: float) -> float:
        return seconds * random.uniform(1 - JITTER, 1 + JITTER)

    async def _live_records(self):
        records = await _lookup(self.dht, self.server.model_key)
        if records is None:
            return None
        return await self.liveness.live_records(records, self.server.span.config.num_hidden_layers)

    async def hole_seen(self) -> bool:
        """Does some block have no live server (counting us)?"""
        me = self.server.record()
        records = await self._live_records() if me is not None else None
        if records is None:
            return False
        others = [r for r in records if r.peer_id != me.peer_id]
        holes = gaps(block_coverage([*others, me], self.server.span.config.num_hidden_layers))
        if holes:
            logger.info("coverage hole(s) %s: checking whether to move", holes)
        return bool(holes)

    async def decide(self) -> RebalanceDecision | None:
        me = self.server.record()
        records = await self._live_records() if me is not None else None
        if records is None:
            return None
        return rebalance_decision(records, me, self.server.span.config.num_hidden_layers)

    async def check_once(self) -> bool:
        """One look at the swarm; True if we moved."""
        decision = await self.decide()
        if decision is None or not decision.move:
            if decision is not None:
                logger.debug("rebalance: staying at [%d, %d): %s", self.server.span.start, self.server.span.end,
                             decision.reason)
            return False
        old = self.server.span
        logger.info("rebalance: moving [%d, %d) -> [%d, %d) (%s); loading", old.start, old.end, *decision.window,
                    decision.reason)
        # abandon_on_cancel: a peer told to leave while loading stops now; the thread's result is dropped.
        new = await trio.to_thread.run_sync(load_moved_span, old, self.server.config.model_dir, *decision.window,
                                            abandon_on_cancel=True)
        again = await self.decide()  # fresh state: did someone move while we loaded? (None: we are leaving)
        if again is None or not again.move or again.window != decision.window or self.server.span is not old:
            logger.info("rebalance: move to [%d, %d) abandoned on re-check: %s", *decision.window,
                        again.reason if again else "lookup failed")
            return False
        await self._switch(old, new)
        return True

    async def _switch(self, old: SpanModel, new: SpanModel) -> None:
        server = self.server
        server.span = server.handler.span = new  # new sessions only; open ones keep session.span
        self.moves += 1
        self._cooldown_until = trio.current_time() + COOLDOWN_INTERVALS * self.interval
        logger.info("rebalance: now serving blocks [%d, %d) (move %d)", new.start, new.end, self.moves)
        with trio.move_on_after(LOOKUP_TIMEOUT):
            try:  # at once: clients and peers deciding now must see where we are
                await self.dht.announce(server.record())
            except Exception:
                logger.warning("announcing the new span failed; the announcer retries", exc_info=True)
        self._nursery.start_soon(self._drop_when_unused, old)

    async def _drop_when_unused(self, old: SpanModel) -> None:
        while any(s.span is old for s in list(self.server.registry.sessions.values())):
            await trio.sleep(DROP_POLL)
        logger.info("rebalance: old span [%d, %d) dropped (no session left on it)", old.start, old.end)
        device = old.device
        del old  # the last reference we hold; blocks shared with the new span stay
        if device.type == "cuda":
            torch.cuda.empty_cache()
