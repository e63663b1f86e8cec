"""Decode ms/token through two volunteer peers: directly dialable, relayed, and hole-punched, over a WAN.

    sudo .venv/bin/python scripts/bench_nat.py [--new-tokens 32] [--runs 5] [--model tiny|smollm2|DIR]
                                               [--delay-ms 20] [--rate-mbit 100] [--loss 0.001]

One NatBed per mode (scripts/nat_bed.py: a bootstrap/relay node and a second relay on the
"internet", peers p0 and p1 and the client each in its own home network):
  direct:    routers without NAT: every peer is public and announces its own address
  relayed:   port-preserving NATs, hole punching off (MOLINK_HOLEPUNCH=0): every data channel and
             the p0 -> p1 push go through a relay
  punched:   the same NATs, punching on: control through the relay, data channels direct
  symmetric: symmetric NATs, punching on: punching fails, everything stays relayed
The internet is shaped like scripts/bench_wan.py's bed (same defaults): every crossing of it (home
-> public, public -> home, home -> home) gets the one-way delay, the rate and the loss; a home's
LAN is not shaped. `--delay-ms 0` gives the unshaped bridge bed (no rate or loss either).
Per mode: the client's greedy generations (the first one warms up: routes, connections, punching),
each run's mean inter-token time; the median of the runs is reported. Spot checks are off (they
add work of their own; this measures the transport).
Floor per mode = compute + crossings x delay. compute: the same two spans and the client's head in
one process (no network), ms/token, measured right before that mode's bed. crossings: how many
times one token's data crosses the internet on the push path client -> p0 -> p1 -> client, from the
transports actually used: a direct or punched leg crosses once, a relayed leg twice (home -> relay
-> home). Serialisation at the rate is left out (the tiny model's hidden state is a few hundred
bytes: < 0.1 ms per crossing at 100 Mbit). Table on stdout, everything in --out as JSON.
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
from wan_swarm import in_process, prompt_of, reference  # noqa: E402

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


def spans_of(model: Path) -> list[tuple[int, int]]:
    layers = json.loads((model / "config.json").read_text())["num_hidden_layers"]
    return [(0, layers // 2), (layers // 2, layers)]


def compute_ms(model: Path, args) -> float:
    """In-process ms/token of the same spans + head (no network): the compute part of the floor."""
    import torch

    from molink.peer.checkpoint import load_config

    torch.set_num_threads(args.threads)
    prompt = prompt_of(12, load_config(model).vocab_size)  # nat_swarm's client prompt
    # in_process generates new_tokens + 1 tokens; the swarm client generates new_tokens
    result, _ = in_process({"model_dir": str(model), "spans": spans_of(model), "new_tokens": args.new_tokens - 1,
                            "repeats": args.runs, "prompt_lengths": []}, {"decode": prompt})
    return result["decode_ms"]


def crossings(client_hops: list[str], p0_to_p1: str) -> int:
    """Internet crossings per token on client -> p0 -> p1 -> client: a relayed leg crosses twice."""
    legs = [client_hops[0], p0_to_p1, client_hops[1]]  # p1 answers on the client's stream to it
    return sum(2 if leg == "relayed" else 1 for leg in legs)


def bench_mode(mode: str, model: Path, args, workdir: Path) -> dict:
    import torch

    nat, env = MODES[mode]
    compute = compute_ms(model, args)
    started = time.monotonic()
    shaping = {"delay_ms": args.delay_ms, "rate_mbit": args.rate_mbit, "loss": args.loss} if args.delay_ms else {}
    with NatBed(["boot", "relay2"], ["p0", "p1", "client"], nat=nat, **shaping) as bed:
        # a UDP echo from the client's home to a public host: one crossing each way (~2 x delay)
        rtt = sorted(bed.measure_rtt("client", "boot", count=10)) if bed.shaped else []
        boots = start_nat_swarm(bed, model, spans_of(model), workdir / mode, env=env, threads=args.threads)
        up = time.monotonic() - started
        result = run_nat_client(bed, {"model_dir": str(model), "initial_peers": boots, "new_tokens": args.new_tokens,
                                      "runs": args.runs + 1, "threads": args.threads,
                                      "spot_check": 0.0}, env=env)
        p0_log = (workdir / mode / "p0.log").read_text()
        links = bed.stats(hosts=False)["links"] if bed.shaped else {}  # packets, bytes, lost per pair
    runs = result["runs"][1:]  # the first run warms up
    p0_to_p1 = data_path_of(p0_log) or "direct"
    hops = crossings(runs[-1]["hops"], p0_to_p1)
    per_run = [statistics.mean(r["step_ms"][1:]) for r in runs]
    tokens = {tuple(r["tokens"]) for r in result["runs"]}
    expected = reference(model, torch.tensor([result["prompt"]]), args.new_tokens)  # transformers' greedy tokens
    return {"mode": mode, "nat": nat, "env": env, "ms_per_token": statistics.median(per_run),
            "runs_ms": per_run, "p90_step_ms": sorted(s for r in runs for s in r["step_ms"][1:])[
                int(0.9 * (sum(len(r["step_ms"]) - 1 for r in runs) - 1))],
            "client_hops": runs[-1]["hops"], "hops_per_run": [r["hops"] for r in runs],
            "recoveries": [r["recoveries"] for r in runs], "p0_to_p1": p0_to_p1,
            "same_tokens_every_run": len(tokens) == 1, "exact": tokens == {tuple(expected)},
            "swarm_start_s": up, "compute_ms": compute,
            "crossings": hops, "delays_ms": hops * args.delay_ms, "floor_ms": compute + hops * args.delay_ms,
            "rtt_client_boot_ms": rtt[len(rtt) // 2] if rtt else None, "link_totals": links}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", help="tiny (6-layer random llama), smollm2, or a model dir")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--runs", type=int, default=5, help="timed runs per mode (after one warm-up run)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--delay-ms", type=float, default=20.0,
                        help="one-way delay per internet crossing (0: the unshaped bridge bed)")
    parser.add_argument("--rate-mbit", type=float, default=100.0, help="rate per direction of each internet pair")
    parser.add_argument("--loss", type=float, default=0.001, help="packet loss probability per crossing")
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
    shaping = (f"{args.delay_ms:g} ms one-way, {args.rate_mbit:g} Mbit/s, {100 * args.loss:.2f} % loss per internet "
               f"crossing (RTT client -> boot {results[0]['rtt_client_boot_ms']:.1f} ms)" if args.delay_ms
               else "no added delay (bridge)")
    print(f"\nDecode through 2 peers ({args.model}, {args.new_tokens} tokens x {args.runs} runs, {shaping}, "
          f"{os.cpu_count()} cores shared; floor = in-process compute + crossings x delay):\n")
    print("| mode | NAT | client -> p0, p1 | p0 -> p1 | crossings/token | ms/token median [min–max] | p90 step | "
          "floor (compute + delays) | tokens = transformers |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['mode']} | {r['nat']} | {', '.join(r['client_hops'])} | {r['p0_to_p1']} | {r['crossings']} | "
              f"{r['ms_per_token']:.1f} [{min(r['runs_ms']):.1f}–{max(r['runs_ms']):.1f}] | {r['p90_step_ms']:.1f} | "
              f"{r['floor_ms']:.1f} ({r['compute_ms']:.1f} + {r['delays_ms']:.0f}) | "
              f"{'yes' if r['exact'] else 'NO'} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    meta = {**vars(args), "cpu_count": os.cpu_count(), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "loadavg_after": " ".join(Path("/proc/loadavg").read_text().split()[:3])}
    Path(args.out).write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
