"""Decode ms/token through two volunteer peers: directly dialable, relayed, and hole-punched.

    sudo .venv/bin/python scripts/bench_nat.py [--new-tokens 32] [--runs 5] [--model tiny|smollm2|DIR]

One NatBed per mode (scripts/nat_bed.py: a bootstrap/relay node and a second relay on the
"internet", peers p0 and p1 and the client each in its own home network):
  direct:    routers without NAT: every peer is public and announces its own address
  relayed:   port-preserving NATs, hole punching off (MOLINK_HOLEPUNCH=0): every data channel and
             the p0 -> p1 push go through a relay
  punched:   the same NATs, punching on: control through the relay, data channels direct
  symmetric: symmetric NATs, punching on: punching fails, everything stays relayed
Per mode: the client's greedy generations (the first one warms up: routes, connections, punching),
each run's mean inter-token time; the median of the runs is reported. Spot checks are off (they
add work of their own; this measures the transport). There is no added delay:
the differences are the relay's own cost (an extra process, py-libp2p's Noise + yamux on both
legs) on this machine's loopback-speed veths. Table on stdout, everything in --out as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

from nat_bed import NatBed, need_root  # noqa: E402
from nat_swarm import data_path_of, run_nat_client, start_nat_swarm  # noqa: E402

MODES = {  # mode -> (NAT kind, environment of every process)
    "direct": ("none", {}),
    "relayed": ("cone", {"MOLINK_HOLEPUNCH": "0"}),
    "punched": ("cone", {}),
    "symmetric": ("symmetric", {}),
}


def model_dir(name: str, workdir: Path) -> Path:
    if name == "tiny":
        from make_tiny_model import make_tiny_model

        return make_tiny_model("llama", workdir / "tiny", layers=6, shards=2)
    if name == "smollm2":
        from molink.swarm.default_model import convert_smollm2

        return convert_smollm2()
    return Path(name)


def bench_mode(mode: str, model: Path, args, workdir: Path) -> dict:
    nat, env = MODES[mode]
    layers = json.loads((model / "config.json").read_text())["num_hidden_layers"]
    spans = [(0, layers // 2), (layers // 2, layers)]
    started = time.monotonic()
    with NatBed(["boot", "relay2"], ["p0", "p1", "client"], nat=nat) as bed:
        boots = start_nat_swarm(bed, model, spans, workdir / mode, env=env, threads=args.threads)
        up = time.monotonic() - started
        result = run_nat_client(bed, {"model_dir": str(model), "initial_peers": boots, "new_tokens": args.new_tokens,
                                      "runs": args.runs + 1, "threads": args.threads,
                                      "spot_check": 0.0}, env=env)
        p0_log = (workdir / mode / "p0.log").read_text()
    runs = result["runs"][1:]  # the first run warms up
    per_run = [statistics.mean(r["step_ms"][1:]) for r in runs]
    tokens = {tuple(r["tokens"]) for r in result["runs"]}
    return {"mode": mode, "nat": nat, "env": env, "ms_per_token": statistics.median(per_run),
            "runs_ms": per_run, "p90_step_ms": sorted(s for r in runs for s in r["step_ms"][1:])[
                int(0.9 * (sum(len(r["step_ms"]) - 1 for r in runs) - 1))],
            "client_hops": runs[-1]["hops"], "hops_per_run": [r["hops"] for r in runs],
            "recoveries": [r["recoveries"] for r in runs], "p0_to_p1": data_path_of(p0_log) or "direct",
            "same_tokens_every_run": len(tokens) == 1, "swarm_start_s": up}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", help="tiny (6-layer random llama), smollm2, or a model dir")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--runs", type=int, default=5, help="timed runs per mode (after one warm-up run)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--out", default=str(ROOT / "bench_results" / "nat.json"))
    args = parser.parse_args()
    need_root()
    modes = args.modes.split(",")
    if not set(modes) <= set(MODES):
        parser.error(f"--modes from {list(MODES)}")
    with tempfile.TemporaryDirectory(prefix="bench-nat-") as tmp:
        model = model_dir(args.model, Path(tmp))
        results = []
        for mode in modes:
            print(f"[nat bench] {mode} ...", file=sys.stderr, flush=True)
            results.append(bench_mode(mode, model, args, Path(tmp)))
    print(f"\nDecode through 2 peers ({args.model}, {args.new_tokens} tokens x {args.runs} runs, "
          f"{os.cpu_count()} cores shared):\n")
    print("| mode | NAT | client -> p0, p1 | p0 -> p1 | ms/token median [min–max] | p90 step | exact |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['mode']} | {r['nat']} | {', '.join(r['client_hops'])} | {r['p0_to_p1']} | "
              f"{r['ms_per_token']:.1f} [{min(r['runs_ms']):.1f}–{max(r['runs_ms']):.1f}] | {r['p90_step_ms']:.1f} | "
              f"{'yes' if r['same_tokens_every_run'] else 'NO'} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": vars(args), "results": results}, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
