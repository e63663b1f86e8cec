"""`molink-swarm status`: who serves which blocks, and where the gaps are."""

from __future__ import annotations

import time
from pathlib import Path

import trio
from libp2p.kad_dht.kad_dht import DHTMode

from molink.crypto.identity import Identity
from molink.crypto.swarm_key import SwarmKey
from molink.dht.host import running_host
from molink.dht.kademlia import SwarmDHT
from molink.dht.records import SpanRecord
from molink.dht.streams import STREAM_ERRORS, dial_framed
from molink.dht.wire import Frame
from molink.peer import protocol as p
from molink.swarm.routing import coverage_gaps

INFO_TIMEOUT = 3.0


def render_table(records: list[SpanRecord], num_blocks: int, now: float | None = None) -> str:
    now = time.time() if now is None else now
    width = min(num_blocks, 60)
    lines = [f"{'peer':<14} {'blocks':<10} {'map':<{width}}  {'tput':>8} {'free cache':>10} {'expires':>8}  {'reach':<8} addrs"]
    for r in sorted(records, key=lambda r: (r.start, r.end)):
        cells = "".join("#" if r.start <= i * num_blocks // width < r.end else "." for i in range(width))
        lines.append(f"{r.peer_id[-12:]:<14} {f'{r.start}:{r.end}':<10} {cells}  {r.throughput:>8.0f} "
                     f"{r.free_cache_tokens:>10} {r.expires_at - now:>7.0f}s  {r.reachability:<8} "
                     f"{r.addrs[0] if r.addrs else '-'}")
    gaps = coverage_gaps(records, num_blocks)
    if gaps:
        lines.append("GAPS (no peer serves these blocks): " + ", ".join(f"{a}:{b}" for a, b in gaps))
    else:
        lines.append(f"all {num_blocks} blocks covered by {len(records)} peer(s)")
    return "\n".join(lines)


async def _peer_infos(host, dht: SwarmDHT) -> list[dict]:
    infos = []

    async def ask(peer_id) -> None:
        try:
            with trio.fail_after(INFO_TIMEOUT):
                async with dial_framed(host, peer_id, p.INFO_PROTOCOL) as framed:
                    reply = await framed.request(Frame(p.INFO, 1, {}))
                    infos.append(reply.body)
        except (trio.TooSlowError, *STREAM_ERRORS):
            pass  # a bootstrap node or a peer of another version: not a span server

    async with trio.open_nursery() as nursery:
        for peer_id in dht.dht.routing_table.get_peer_ids():
            nursery.start_soon(ask, peer_id)
    return infos


async def collect_status(initial_peers: list[str], model_dir: Path | None, swarm_key: SwarmKey | None = None):
    identity = Identity.generate()
    async with running_host(identity.keypair, swarm_key=swarm_key) as host:
        dht = SwarmDHT(host, identity, mode=DHTMode.CLIENT)
        async with dht.running():
            if await dht.bootstrap(initial_peers) == 0:
                raise ConnectionError(f"none of the initial peers answered: {initial_peers}")
            if model_dir is not None:
                from molink.peer.checkpoint import load_config
                from molink.peer.model_key import model_key_for

                key = model_key_for(model_dir)
                return key, load_config(model_dir).num_hidden_layers, await dht.find_spans(key)
            return None, None, await _peer_infos(host, dht)


def print_status(initial_peers: list[str], model_dir: Path | None, swarm_key: SwarmKey | None = None) -> int:
    key, num_blocks, found = trio.run(collect_status, initial_peers, model_dir, swarm_key)
    if key is not None:
        print(f"model {model_dir} (key {key}), {num_blocks} blocks")
        print(render_table(found, num_blocks))
        return 0 if not coverage_gaps(found, num_blocks) else 1
    if not found:
        print("no span servers among the peers the bootstrap knows")
        return 1
    by_model: dict[str, list[dict]] = {}
    for info in found:
        by_model.setdefault(str(info.get("model_key")), []).append(info)
    for model_key, infos in by_model.items():
        print(f"model key {model_key}:")
        for info in sorted(infos, key=lambda i: i.get("start", 0)):
            print(f"  {str(info.get('peer_id'))[-12:]:<14} blocks {info.get('start')}:{info.get('end')}  "
                  f"sessions {info.get('sessions')}  free cache {info.get('free_cache_tokens')}")
    print("(pass --model to check coverage against the model's block count)")
    return 0
