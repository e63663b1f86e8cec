"""Spot checks (swarm/spot_check.py): what they cost and how often they catch a liar.

    python scripts/bench_spot_check.py [--model tiny|smollm2|DIR] [--rates 0,0.1,0.25,1]
        [--generations 20] [--new-tokens 32] [--detect-generations 60] [--detect-rate 0.1]
        [--out bench_results/spot_check.json]

One swarm on 127.0.0.1: a bootstrap, two honest replicas of each half of the model, and two
liars on the second half (MOLINK_FAULTS corrupt=1 and corrupt=0.05, seeded).

Cost: with the liars banned, the same client runs --generations greedy generations (batch 1,
--new-tokens each) at every spot-check rate, interleaved; rate 0 is spot checks off (no taps).
We report ms/token, the overhead against rate 0 and the share of hop-tokens verifiers re-ran.

Detection: --detect-generations generations forced through each liar (the honest replicas are
only avoided for the first route, so they can still verify) at --detect-rate; we count the
generations in which the liar was caught, next to the prediction rate x P(it lied at least once
in that generation), and check every output against transformers.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

from bench_latency import git_state, loadavg  # noqa: E402
from make_tiny_model import bench_model_dir  # noqa: E402

from molink.swarm import DistributedModelForCausalLM  # noqa: E402
from molink.swarm.local_swarm import LocalSwarm  # noqa: E402
from molink.swarm.routing import BanList  # noqa: E402
from molink.swarm.spot_check import SpotCheckConfig  # noqa: E402

PROMPT_TOKENS = 16
LIARS = {"liar100": "corrupt=1,seed=1", "liar5": "corrupt=0.05,seed=2"}


def log(message: str) -> None:
    print(f"[spot-check] {message}", file=sys.stderr, flush=True)


def peer_id(peer) -> str:
    return peer.address.split("/p2p/")[1]


def prompt(seed: int, length: int = PROMPT_TOKENS) -> torch.Tensor:
    return torch.randint(3, 400, (1, length), generator=torch.Generator().manual_seed(seed))


def measure_cost(swarm, model_dir: Path, rates: list[float], generations: int, new_tokens: int) -> list[dict]:
    """Every rate has its own client; generations are interleaved (round g runs every rate once),
    so load that comes and goes on the machine hits every rate alike."""
    liars = [peer_id(p) for p in swarm.peers if p.name in LIARS]
    clients, stats = {}, {}
    with contextlib.ExitStack() as stack:
        for rate in rates:
            model = stack.enter_context(DistributedModelForCausalLM.from_pretrained(
                model_dir, swarm.initial_peers, spot_check=SpotCheckConfig(rate=rate, seed=7)))
            for liar in liars:
                model.bans.ban_liar(liar)
            model.generate(prompt(99), max_new_tokens=4, do_sample=False)  # warm: connections, records
            clients[rate], stats[rate] = model, {"seconds": 0.0, "audits": 0, "rerun": 0, "hops": 0}
        for g in range(generations):
            for rate, model in clients.items():
                start = time.perf_counter()
                model.generate(prompt(g), max_new_tokens=new_tokens, do_sample=False)
                stats[rate]["seconds"] += time.perf_counter() - start
                checks = model.last_spot_checks
                stats[rate]["audits"] += checks.get("audits", 0)
                stats[rate]["rerun"] += checks.get("tokens_rerun", 0)
                stats[rate]["hops"] += len(model.last_route)
    rows = []
    processed = generations * (PROMPT_TOKENS + new_tokens - 1)  # tokens each hop computes
    for rate in rates:
        st = stats[rate]
        rows.append({"rate": rate, "ms_per_token": 1000 * st["seconds"] / (generations * new_tokens),
                     "audits": st["audits"], "rerun_fraction": st["rerun"] / (processed * st["hops"] / generations)})
        log(f"rate {rate}: {rows[-1]['ms_per_token']:.2f} ms/token, {st['audits']} audits")
    base = rows[0]["ms_per_token"]
    for row in rows:
        row["overhead_pct"] = 100 * (row["ms_per_token"] / base - 1)
    return rows


def measure_detection(swarm, model_dir: Path, reference, rate: float, generations: int, new_tokens: int) -> list[dict]:
    rows = []
    honest = [peer_id(p) for p in swarm.peers[2:] if p.name not in LIARS]
    for name, spec in LIARS.items():
        liar = peer_id(next(p for p in swarm.peers if p.name == name))
        others = [peer_id(p) for p in swarm.peers if p.name in LIARS and p.name != name]
        corrupt = float(spec.split(",")[0].split("=")[1])
        caught = exact = 0
        with DistributedModelForCausalLM.from_pretrained(model_dir, swarm.initial_peers,
                                                         spot_check=SpotCheckConfig(rate=rate, seed=1)) as model:
            for g in range(generations):
                model.bans = BanList()  # every generation meets the liar afresh
                for other in others:
                    model.bans.ban_liar(other)
                for peer in honest:
                    model.bans.avoid(peer, 1.0)
                ids = prompt(1000 + g)
                got = model.generate(ids, max_new_tokens=new_tokens, do_sample=False)
                expected = reference.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                              do_sample=False)
                caught += any(lie["peer_id"] == liar for lie in model.last_lies)
                exact += bool(torch.equal(got, expected))
                time.sleep(1.0)  # let the avoidance of the honest peers lapse before the next round
        lied_at_least_once = 1 - (1 - corrupt) ** new_tokens
        rows.append({"liar": name, "corrupt": corrupt, "rate": rate, "generations": generations,
                     "caught": caught, "detection": caught / generations,
                     "predicted": rate * lied_at_least_once, "exact_outputs": exact})
        log(f"{name}: caught in {caught}/{generations} generations; exact outputs {exact}/{generations}")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--rates", default="0,0.1,0.25,1")
    parser.add_argument("--generations", type=int, default=20)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--detect-generations", type=int, default=60)
    parser.add_argument("--detect-rate", type=float, default=0.1)
    parser.add_argument("--out", default="bench_results/spot_check.json")
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM

    with tempfile.TemporaryDirectory(prefix="molink-bench-spot-") as tmp:
        model_dir = bench_model_dir(args.model, Path(tmp))
        reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).train(False)
        layers = reference.config.num_hidden_layers
        half = layers // 2
        log(f"starting the swarm ({args.model}, {layers} blocks: 2 x [0, {half}), 2 x [{half}, {layers}), 2 liars)")
        with LocalSwarm(model_dir, [(0, half), (0, half), (half, layers), (half, layers)],
                        workdir=Path(tmp) / "swarm") as swarm:
            for name, spec in LIARS.items():
                swarm.add_peer((half, layers), name=name, extra_env={"MOLINK_FAULTS": spec})
            rates = [float(r) for r in args.rates.split(",")]
            cost = measure_cost(swarm, model_dir, rates, args.generations, args.new_tokens)
            detection = measure_detection(swarm, model_dir, reference, args.detect_rate, args.detect_generations,
                                          args.new_tokens) if args.detect_generations > 0 else []
    print(f"\nSpot-check cost ({args.model}, {args.generations} generations x {args.new_tokens} tokens, batch 1, "
          f"2 hops, every hop has a replica)\n")
    print("| rate | ms/token | overhead vs off | audits | share of hop-tokens re-run |")
    print("|---|---|---|---|---|")
    for row in cost:
        print(f"| {row['rate']:g} | {row['ms_per_token']:.2f} | {row['overhead_pct']:+.1f} % | {row['audits']} | "
              f"{row['rerun_fraction']:.2f} |")
    if detection:
        print(f"\nDetection per generation at rate {args.detect_rate:g} ({args.new_tokens} tokens each)\n")
        print("| liar | generations caught | measured | predicted rate x P(lied) | outputs exact |")
        print("|---|---|---|---|---|")
        for row in detection:
            print(f"| corrupts {100 * row['corrupt']:g} % | {row['caught']}/{row['generations']} | {row['detection']:.2f} | "
                  f"{row['predicted']:.2f} | {row['exact_outputs']}/{row['generations']} |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": args.model, "new_tokens": args.new_tokens, "cost": cost,
                               "detection": detection, "git": git_state(), "loadavg": loadavg()}, indent=2))
    log(f"wrote {out}")


if __name__ == "__main__":
    main()
