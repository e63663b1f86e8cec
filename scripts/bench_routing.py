"""How long route planning takes for swarms of 10-400 peers (goal: <= 10 ms for 100 peers).

    python scripts/bench_routing.py [--out bench_results/routing.json]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

from molink.crypto.identity import Identity
from molink.dht.records import SpanRecord
from molink.swarm.routing import make_route

ROOT = Path(__file__).resolve().parent.parent


def swarm(peers: int, blocks: int, rng: random.Random) -> tuple[list[SpanRecord], dict[str, float]]:
    """Random spans; every peer announces a load and RTTs to up to 16 successors (as peers do)."""
    identities = [Identity.generate() for _ in range(peers)]
    spans = []
    for i in range(peers):
        length = rng.randint(4, 12)
        start = (i * blocks // peers) % (blocks - length) if i >= 2 else i * blocks // 2
        spans.append((start, start + length if i >= 2 else start + blocks // 2))
    ids = [identity.peer_id.to_base58() for identity in identities]
    records = []
    for identity, (start, end) in zip(identities, spans):
        successors = [peer for peer, (s, e) in zip(ids, spans) if s <= end < e][:16]
        records.append(SpanRecord.create(identity, "0" * 40, start, end, ["/ip4/127.0.0.1/tcp/1"],
                                         rng.uniform(10, 1000), 10_000, "bench", sessions=rng.randint(0, 3),
                                         next_rtts={peer: rng.uniform(0.001, 0.1) for peer in successors}))
    return records, {r.peer_id: rng.uniform(0.001, 0.1) for r in records}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / "bench_results" / "routing.json"))
    args = parser.parse_args()
    rng, rows = random.Random(0), []
    for peers, blocks in ((10, 30), (100, 80), (400, 80)):
        records, rtts = swarm(peers, blocks, rng)
        times = []
        for _ in range(50):
            started = time.perf_counter()
            make_route(records, blocks, rtts=rtts, load={})
            times.append(1000 * (time.perf_counter() - started))
        rows.append({"peers": peers, "blocks": blocks, "median_ms": statistics.median(times), "max_ms": max(times)})
    print("| peers | blocks | median ms | max ms |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['peers']} | {r['blocks']} | {r['median_ms']:.2f} | {r['max_ms']:.2f} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
