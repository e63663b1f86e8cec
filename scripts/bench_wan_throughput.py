"""Throughput under load on the WAN bed: concurrent sessions, with step bundles and without.

    sudo .venv/bin/python scripts/bench_wan_throughput.py [--model tiny] [--sessions 1,8,32]
        [--new-tokens 32] [--delay-ms 20] [--rate-mbit 100] [--loss 0.001]
        [--out bench_results/wan_throughput.json]

The bed of scripts/bench_wan.py (bootstrap, 3 peers with one span each, a client, every link with
the given one-way delay, rate and loss; needs root). In the client's namespace three clients run
each level one after the other: one bundling the decode steps of sessions that are ready together
(swarm/step_bundles.py) and gathering them into cohorts (swarm/cohorts.py), the default; one
bundling without cohorts; one sending every step alone. A level = N greedy generations
started together (bench_throughput.py's run_sessions); aggregate tokens/s and inter-token latency
p50/p99 over the steady state (every session started, none finished). Peers batch (the default;
`--peer-args=--no-batching` for the comparison).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

from bench_latency import git_state  # noqa: E402
from bench_wan import HOSTS, model_dir  # noqa: E402
from wan_bed import WanBed, need_root  # noqa: E402
from wan_swarm import run_client, start_swarm  # noqa: E402


def log(message: str) -> None:
    print(f"[wan-throughput] {message}", file=sys.stderr, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", help="tiny, smollm2 or a model dir")
    parser.add_argument("--sessions", default="1,8,32")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--delay-ms", type=float, default=20.0)
    parser.add_argument("--rate-mbit", type=float, default=100.0)
    parser.add_argument("--loss", type=float, default=0.001)
    parser.add_argument("--spot-check", type=float, default=0.0)
    parser.add_argument("--peer-args", default="", help="extra molink-peer join arguments, e.g. --no-batching")
    parser.add_argument("--out", default=str(ROOT / "bench_results" / "wan_throughput.json"))
    args = parser.parse_args()
    need_root()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwinds the bed's with-block
    from molink.peer.checkpoint import load_config
    from molink.swarm.model import even_boundaries

    workroot = Path(tempfile.mkdtemp(prefix="molink-bench-wan-tp-"))
    try:
        directory = model_dir(args.model, workroot)
        spans = even_boundaries(load_config(directory).num_hidden_layers, 3)
        with WanBed(HOSTS, args.delay_ms, args.rate_mbit, args.loss) as bed:
            log(f"bed up ({bed.backend}); starting bootstrap + 3 peers {spans}")
            boot = start_swarm(bed, directory, spans, workroot / "swarm", extra_args=args.peer_args.split())
            cfg = {"model_dir": str(directory), "initial_peers": [boot], "new_tokens": args.new_tokens,
                   "prompt_tokens": args.prompt_tokens, "spot_check": args.spot_check,
                   "sessions": [int(n) for n in args.sessions.split(",")]}
            levels = run_client(bed, "throughput", cfg)["levels"]
    finally:
        shutil.rmtree(workroot, ignore_errors=True)
    single = {r["mode"]: r for r in levels if r["sessions"] == 1}
    print(f"\n{args.model} on the WAN bed ({args.delay_ms:g} ms one-way, {args.rate_mbit:g} Mbit/s, "
          f"{100 * args.loss:g} % loss per link), {args.new_tokens} new tokens per session, greedy\n")
    print("| sessions | client | tokens/s | x1 | ITL p50 ms | ITL p99 ms | cohort holds |")
    print("|---|---|---|---|---|---|---|")
    for r in levels:
        base = single.get(r["mode"])
        ratio = f"{r['tokens_per_s'] / base['tokens_per_s']:.1f}" if base else ""
        holds = r.get("cohort_holds")
        print(f"| {r['sessions']} | {r['mode']} | {r['tokens_per_s']:.1f} | {ratio} | {r['itl_p50_ms']:.1f} | "
              f"{r['itl_p99_ms']:.1f} | {'–' if holds is None else holds} |")
    meta = {"model": args.model, "peer_args": args.peer_args, "delay_ms": args.delay_ms, "rate_mbit": args.rate_mbit, "loss": args.loss,
            "new_tokens": args.new_tokens, "cpu_count": os.cpu_count(), "git": git_state(),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "levels": levels}, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
