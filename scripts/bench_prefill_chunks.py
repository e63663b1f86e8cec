"""Time to first token on loopback with prompt chunks planned by the route vs the route-blind rule.

    python scripts/bench_prefill_chunks.py [--models tiny,smollm2] [--prompts 300,1024] [--rounds 4]
                                           [--out bench_results/prefill_chunks.json]

One swarm of 3 peer processes (+ bootstrap) on 127.0.0.1 per model and ONE client: each round runs
every prompt length once with MOLINK_PREFILL_CHUNKS=planned (swarm/prefill_plan.py) and once with
the fixed rule (fixed_chunks), in alternating order, greedy, one new token, spot checks off. A
prompt is random tokens, new each run (no cache to reuse). The client's first generation warms up
and is not counted. The table gives the median and range per setting and the chunks each run used
(the planner's first plan is its prediction alone; later ones follow what it measured). The WAN bed
counterpart is scripts/bench_wan.py (MOLINK_PREFILL_CHUNKS=planned|fixed around it).
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

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

from bench_latency import git_state, loadavg  # noqa: E402

MODES = ("planned", "fixed")


def log(message: str) -> None:
    print(f"[prefill-chunks] {message}", file=sys.stderr, flush=True)


def model_dir_for(name: str, tmp: Path) -> Path:
    from make_tiny_model import bench_model_dir

    return bench_model_dir(name, tmp, positions=4096)


def bench_model(name: str, model_dir: Path, args, workdir: Path) -> dict:
    from molink.peer.checkpoint import load_config
    from molink.swarm import DistributedModelForCausalLM
    from molink.swarm.local_swarm import LocalSwarm
    from molink.swarm.model import even_boundaries

    config = load_config(model_dir)
    spans = even_boundaries(config.num_hidden_layers, 3)
    runs = []
    generator = torch.Generator().manual_seed(0)
    log(f"{name}: starting 3 peers {spans}")
    with LocalSwarm(model_dir, spans, workdir=workdir, torch_threads=args.threads) as swarm:
        with DistributedModelForCausalLM.from_pretrained(model_dir, swarm.initial_peers, spot_check=0) as client:
            client.generation_config.eos_token_id = None

            def prompt_ttft(tokens: int) -> tuple[float, int]:
                ids = torch.randint(3, min(400, config.vocab_size), (1, tokens), generator=generator)
                started = time.perf_counter()
                client.generate(ids, max_new_tokens=1, do_sample=False)
                chunks = sum(1 for hidden, _ in client.last_chain.history if hidden.shape[1] > 1)
                return time.perf_counter() - started, chunks

            prompt_ttft(min(args.prompts))  # warm-up: streams, caches, the first plan's lookups
            for rnd in range(args.rounds):
                for tokens in args.prompts:
                    for mode in MODES if rnd % 2 == 0 else MODES[::-1]:
                        os.environ["MOLINK_PREFILL_CHUNKS"] = mode
                        seconds, chunks = prompt_ttft(tokens)
                        runs.append({"mode": mode, "tokens": tokens, "ms": 1000 * seconds, "chunks": chunks})
                        log(f"{name}: round {rnd + 1}, {tokens} tokens, {mode}: {1000 * seconds:.1f} ms "
                            f"in {chunks} chunk(s)")
    os.environ.pop("MOLINK_PREFILL_CHUNKS", None)
    return {"model": name, "spans": spans, "runs": runs}


def summary(result: dict, tokens: int, mode: str) -> dict:
    runs = [r for r in result["runs"] if r["tokens"] == tokens and r["mode"] == mode]
    times = [r["ms"] for r in runs]
    return {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times),
            "chunks": [r["chunks"] for r in runs]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="tiny,smollm2", help="comma-separated: tiny, smollm2 or a model dir")
    parser.add_argument("--prompts", default="300,1024", help="prompt lengths in tokens")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1, help="torch threads in this process and in each peer")
    parser.add_argument("--out", default=str(ROOT / "bench_results" / "prefill_chunks.json"))
    args = parser.parse_args()
    args.prompts = [int(x) for x in args.prompts.split(",")]
    torch.set_num_threads(args.threads)
    results = []
    with tempfile.TemporaryDirectory(prefix="molink-bench-prefill-") as tmp:
        for name in args.models.split(","):
            model_dir = model_dir_for(name, Path(tmp))
            results.append(bench_model(name, model_dir, args, Path(tmp) / f"swarm-{name}"))
    print(f"\nTTFT on loopback (3 peers + client on {os.cpu_count()} cores), one client, {args.rounds} alternating "
          "rounds; ms, median [min-max]; chunks per run")
    print("\n| model | prompt | planned | chunks | fixed | chunks |")
    print("|---|---|---|---|---|---|")
    for result in results:
        for tokens in args.prompts:
            cells = []
            for mode in MODES:
                s = summary(result, tokens, mode)
                cells += [f"{s['median_ms']:.1f} [{s['min_ms']:.1f}-{s['max_ms']:.1f}]", ",".join(map(str, s["chunks"]))]
            print(f"| {result['model']} | {tokens} | " + " | ".join(cells) + " |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    meta = {"git": git_state(), "loadavg": loadavg(), "rounds": args.rounds, "prompts": args.prompts,
            "cpu_count": os.cpu_count(), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    Path(args.out).write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
