"""Throughput under load: aggregate tokens/s and inter-token latency with continuous batching on and off.

    python scripts/bench_throughput.py [--models tiny,smollm2] [--sessions 1,8,32,64] [--new-tokens 32]
                                       [--prompt-tokens 16] [--threads 1] [--long-prompt 1024]
                                       [--running 8] [--batch-rows 32] [--micro-batches 1,2,3,4,auto]
                                       [--out bench_results/throughput.json]

Two swarms of 3 peer processes each (+ a bootstrap each) on 127.0.0.1, the model split evenly:
one with batching on (peer/scheduler.py: continuous batching, decode first), one started with
`--no-batching` (every step alone, as they come: what the peers did before). Both stay up the
whole run; for every concurrency level the two are measured one after the other, and the batching
swarm once more from a client that sends every decode step in a frame of its own ("unbundled":
swarm/step_bundles.py off; the default client bundles the steps that are ready together).

A level = N sessions started at once from one client process (async, on the client's event loop),
each a greedy generation of --new-tokens tokens from its own random prompt, EOS off. Every token's
arrival is stamped (a streamer). Steady state = from the moment every session has its first token
to the moment the first session finishes: aggregate tokens/s counts the tokens of all sessions
that arrive in it, and the inter-token latencies (ITL) are the gaps between a session's
consecutive tokens that end in it (p50, p99 over all sessions).

Long prompt: --running sessions decode; once each has a few tokens, a new session sends a
--long-prompt-token prompt. We report the running sessions' ITL p50/p99/max while that prompt is
being prefilled (from its arrival to its first token) and in the second before it.

Micro-batches: one client makes ONE greedy generate call with a batch of --batch-rows prompts,
split into k pipelined sessions (swarm/micro_batches.py; "auto": swarm/pipeline_cost.py's choice);
tokens/s = rows x new tokens / the call's wall time (prefill included).

The client, every peer and the bootstrap share this machine's cores: at high concurrency the
client's own work (embeddings, lm_head and sampling) competes with the peers'. The client's
lm_head runs once per step for all sessions waiting on it (swarm/head_batcher.py): "head batch"
is the mean number of generations per head forward during a level.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import signal
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
import trio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

from bench_latency import git_state, loadavg, percentile  # noqa: E402

MODES = ("on", "off")  # the two swarms: peers batching or not
# levels also run "unbundled": the batching swarm, from a client that sends every decode step in a
# frame of its own (swarm/step_bundles.py off), to show what bundling the steps adds
LEVEL_MODES = ("on", "unbundled", "off")
# sessions open this far apart: 64 sessions x 3 hops dialled in the same millisecond is a connection
# storm, not the load we measure (the steady-state window starts once all have started anyway)
OPEN_STAGGER = 0.01
MODE_ARGS = {"on": [], "off": ["--no-batching"]}


def log(message: str) -> None:
    print(f"[throughput] {message}", file=sys.stderr, flush=True)


def model_dir_for(name: str, tmp: Path) -> Path:
    from make_tiny_model import bench_model_dir

    return bench_model_dir(name, tmp, positions=4096)  # room for the longest prompt


class Stamps:
    """A streamer that stamps every new token (the first put is the prompt: skipped)."""

    def __init__(self):
        self.times: list[float] = []
        self._prompt_seen = False

    def put(self, value) -> None:
        if self._prompt_seen:
            self.times.append(time.perf_counter())
        self._prompt_seen = True

    def end(self) -> None:
        pass


async def peer_stats(client, swarm) -> list[dict]:
    """Each peer's INFO answer (its batching counters), through the client's own host."""
    from molink.dht.host import connect_peer
    from molink.dht.streams import dial_framed
    from molink.dht.wire import Frame
    from molink.peer import protocol as p

    infos = []
    for peer in swarm.peers:
        peer_id = await connect_peer(client.host, peer.address)
        async with dial_framed(client.host, peer_id, p.INFO_PROTOCOL) as framed:
            infos.append((await framed.request(Frame(p.INFO, 1, {}), timeout=10)).body)
    return infos


def prompts_for(n: int, length: int, vocab: int, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, min(vocab, 400), (1, length), generator=gen) for _ in range(n)]


def run_sessions(client, prompts: list[torch.Tensor], new_tokens: int) -> list[Stamps]:
    """All prompts as concurrent generations; the token stamps of each."""
    from molink.swarm.generation import merged_generation_config

    config = merged_generation_config(client.generation_config, max_new_tokens=new_tokens, do_sample=False)
    stamps = [Stamps() for _ in prompts]

    async def all_at_once():
        async with trio.open_nursery() as nursery:
            for ids, stamp in zip(prompts, stamps):
                nursery.start_soon(client.generate_async, ids, None, config, stamp)
                await trio.sleep(OPEN_STAGGER)

    client._run(all_at_once)
    return stamps


def steady_metrics(stamps: list[Stamps]) -> dict:
    start = max(s.times[0] for s in stamps)
    end = min(s.times[-1] for s in stamps)
    if end - start < 1e-3:  # no common stretch (one session): the whole decode of each
        start, end = min(s.times[0] for s in stamps), max(s.times[-1] for s in stamps)
    gaps = [b - a for s in stamps for a, b in zip(s.times, s.times[1:]) if start < b <= end]
    tokens = sum(1 for s in stamps for t in s.times[1:] if start < t <= end)
    return {"tokens_per_s": tokens / (end - start), "itl_p50_ms": 1000 * percentile(gaps, 50),
            "itl_p99_ms": 1000 * percentile(gaps, 99), "steady_s": end - start, "steady_tokens": tokens}


def batch_delta(before: list[dict], after: list[dict]) -> float | None:
    """Mean sessions per decode forward over all peers during a level (None: batching off)."""
    rows = forwards = 0
    if not before or not after:
        return None
    for b, a in zip(before, after):
        if not a.get("batching"):
            return None
        rows += a["batching"]["decode_rows"] - b["batching"]["decode_rows"]
        forwards += a["batching"]["decode_forwards"] - b["batching"]["decode_forwards"]
    return rows / forwards if forwards else None


def stack_reuse_delta(before: list[dict], after: list[dict]) -> float | None:
    """Share of batched forwards during a level that found their sessions' KV still stacked."""
    if not before or not after or not all(a.get("batching") for a in after):
        return None
    built = sum(a["batching"].get("stacks_built", 0) - b["batching"].get("stacks_built", 0)
                for b, a in zip(before, after))
    reused = sum(a["batching"].get("stacks_reused", 0) - b["batching"].get("stacks_reused", 0)
                 for b, a in zip(before, after))
    return reused / (built + reused) if built + reused else None


def try_peer_stats(client, swarm) -> list[dict] | None:
    """The peers' counters, or None: a flaky INFO stream must not cost the run (they are a bonus)."""
    for _ in range(3):
        try:
            return client._run(peer_stats, client, swarm)
        except Exception as exc:  # noqa: BLE001
            log(f"  peer INFO failed ({type(exc).__name__}); retrying")
    return None


def measure_level(client, swarm, n: int, args, vocab: int) -> dict:
    before = try_peer_stats(client, swarm)
    head_before = client.head_batcher.stats.as_dict()
    started = time.perf_counter()
    stamps = run_sessions(client, prompts_for(n, args.prompt_tokens, vocab, seed=n), args.new_tokens)
    wall = time.perf_counter() - started
    after = try_peer_stats(client, swarm) if before else None
    head = {key: client.head_batcher.stats.as_dict()[key] - head_before[key] for key in ("requests", "steps")}
    return {"sessions": n, **steady_metrics(stamps), "wall_s": wall, "mean_batch": batch_delta(before, after),
            "stack_reuse": stack_reuse_delta(before, after),
            "head_batch": head["requests"] / head["steps"] if head["steps"] else None, "loadavg": loadavg()}


def measure_micro_batches(client, setting, args, vocab: int) -> dict:
    """One greedy generate call of --batch-rows rows as `setting` micro-batches; tokens/s of the call."""
    from molink.swarm.generation import merged_generation_config
    from molink.swarm.micro_batches import micro_batch_count

    rows, new = args.batch_rows, args.new_tokens
    ids = torch.cat(prompts_for(rows, args.prompt_tokens, vocab, seed=rows))
    config = merged_generation_config(client.generation_config, max_new_tokens=new, do_sample=False)
    k = client._run(micro_batch_count, client, setting, rows, ids.shape[1] + new, config)
    started = time.perf_counter()
    client._run(client.generate_async, ids, None, config, None, k)
    wall = time.perf_counter() - started
    return {"rows": rows, "setting": str(setting), "k": k, "tokens_per_s": rows * new / wall,
            "ms_per_step": 1000 * wall / new, "loadavg": loadavg()}


def long_prompt_test(client, args, vocab: int) -> dict:
    """ITL of --running decoding sessions while a --long-prompt-token prompt arrives."""
    from molink.swarm.generation import merged_generation_config

    running_config = merged_generation_config(client.generation_config, max_new_tokens=100_000, do_sample=False)
    long_config = merged_generation_config(client.generation_config, max_new_tokens=1, do_sample=False)
    running = [Stamps() for _ in range(args.running)]
    long_stamp = Stamps()
    prompts = prompts_for(args.running, args.prompt_tokens, vocab, seed=7)
    long_ids = prompts_for(1, args.long_prompt, vocab, seed=8)[0]
    marks = {}

    async def scenario():
        async with trio.open_nursery() as nursery:
            for ids, stamp in zip(prompts, running):
                nursery.start_soon(client.generate_async, ids, None, running_config, stamp)
            with trio.fail_after(300):
                while min(len(s.times) for s in running) < 8:  # all in steady decode
                    await trio.sleep(0.01)
                await trio.sleep(1.0)  # the "before" window
                marks["arrive"] = time.perf_counter()
                await client.generate_async(long_ids, None, long_config, long_stamp)
                marks["first_token"] = long_stamp.times[0]
                await trio.sleep(0.5)
            nursery.cancel_scope.cancel()

    client._run(scenario)
    arrive, first = marks["arrive"], marks["first_token"]

    def gaps_between(lo, hi):
        return [b - a for s in running for a, b in zip(s.times, s.times[1:]) if lo < b <= hi]

    during, before = gaps_between(arrive, first), gaps_between(arrive - 1.0, arrive)
    ms = lambda values, q: 1000 * percentile(values, q)  # noqa: E731
    return {"running": args.running, "long_prompt": args.long_prompt, "prefill_s": first - arrive,
            "during_p50_ms": ms(during, 50), "during_p99_ms": ms(during, 99),
            "during_max_ms": 1000 * max(during) if during else None, "during_gaps": len(during),
            "before_p50_ms": ms(before, 50), "before_p99_ms": ms(before, 99)}


def bench_model(name: str, model_dir: Path, args, stack: contextlib.ExitStack, workroot: Path) -> dict:
    from molink.peer.checkpoint import load_config
    from molink.swarm import DistributedModelForCausalLM
    from molink.swarm.local_swarm import LocalSwarm
    from molink.swarm.model import even_boundaries

    config = load_config(model_dir)
    spans = even_boundaries(config.num_hidden_layers, 3)
    swarms, clients = {}, {}
    for mode in MODES:
        log(f"{name}: starting a swarm of 3 peers {spans}, batching {mode}")
        swarm = LocalSwarm(model_dir, spans, workdir=workroot / f"{name}-{mode}", torch_threads=args.threads,
                           extra_args=MODE_ARGS[mode] + args.peer_args.split())
        stack.callback(swarm.stop)
        swarm.start()
        swarms[mode] = swarm
        clients[mode] = stack.enter_context(DistributedModelForCausalLM.from_pretrained(
            model_dir, swarm.initial_peers, spot_check=args.spot_check))
        clients[mode].generation_config.eos_token_id = None  # every session makes every token
        run_sessions(clients[mode], prompts_for(2, args.prompt_tokens, config.vocab_size, 0), 4)  # warm-up
    swarms["unbundled"] = swarms["on"]
    clients["unbundled"] = stack.enter_context(DistributedModelForCausalLM.from_pretrained(
        model_dir, swarms["on"].initial_peers, spot_check=args.spot_check))
    clients["unbundled"].step_bundles = None
    clients["unbundled"].generation_config.eos_token_id = None
    run_sessions(clients["unbundled"], prompts_for(2, args.prompt_tokens, config.vocab_size, 0), 4)
    levels = []
    for n in args.sessions:
        for mode in LEVEL_MODES:
            row = {"mode": mode, **measure_level(clients[mode], swarms[mode], n, args, config.vocab_size)}
            levels.append(row)
            save_partial(args, {"model": name, "levels": levels, "partial": True})
            log(f"{name}: {n:3d} sessions, batching {mode:9s}: {row['tokens_per_s']:7.1f} tok/s, ITL p50 "
                f"{row['itl_p50_ms']:.1f} ms p99 {row['itl_p99_ms']:.1f} ms, mean batch {row['mean_batch']}")
    micro = []
    for setting in args.micro_batches if args.batch_rows else []:
        for mode in MODES:
            micro.append({"mode": mode, **measure_micro_batches(clients[mode], setting, args, config.vocab_size)})
            log(f"{name}: {args.batch_rows} rows in one call, micro_batches={setting} (k={micro[-1]['k']}), batching "
                f"{mode}: {micro[-1]['tokens_per_s']:.1f} tok/s")
    long_prompt = {}
    if args.long_prompt:
        for mode in MODES:
            long_prompt[mode] = long_prompt_test(clients[mode], args, config.vocab_size)
            log(f"{name}: long prompt, batching {mode}: {long_prompt[mode]}")
    return {"model": name, "model_dir": str(model_dir), "layers": config.num_hidden_layers, "spans": spans,
            "levels": levels, "micro_batches": micro, "long_prompt": long_prompt}


def save_partial(args, result: dict) -> None:
    """Every finished level is on disk at once: a later failure (a swarm that stops answering at 64
    sessions) must not lose the levels already measured."""
    done = [r for r in getattr(args, "finished", [])]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": {"partial": True}, "results": done + [result]}, indent=2))


def print_tables(results: list[dict], args) -> None:
    print(f"\nAggregate decode throughput, 3 peers + 1 client on {os.cpu_count()} cores, {args.threads} torch "
          f"thread(s) per process, greedy, {args.prompt_tokens}-token prompts, {args.new_tokens} new tokens per "
          f"session; steady state = every session started, none finished. x1 = tokens/s / the same mode's "
          f"1-session tokens/s; ITL = inter-token latency; mean batch = sessions per decode forward, all peers; "
          f"stacked = share of batched forwards whose sessions' KV was still stacked from the forward before.")
    print("\n| model | sessions | batching | tokens/s | x1 | ITL p50 ms | ITL p99 ms | p50 / 1-session p50 "
          "| mean batch | stacked | head batch |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for result in results:
        single = {r["mode"]: r for r in result["levels"] if r["sessions"] == 1}
        for r in result["levels"]:
            base = single.get(r["mode"])
            speedup = f"{r['tokens_per_s'] / base['tokens_per_s']:.1f}x" if base else ""
            ratio = f"{r['itl_p50_ms'] / base['itl_p50_ms']:.2f}" if base else ""
            batch = f"{r['mean_batch']:.1f}" if r["mean_batch"] else "–"
            head = f"{r['head_batch']:.1f}" if r.get("head_batch") else "–"
            stacked = f"{100 * r['stack_reuse']:.0f} %" if r.get("stack_reuse") is not None else "–"
            print(f"| {result['model']} | {r['sessions']} | {r['mode']} | {r['tokens_per_s']:.1f} | {speedup} | "
                  f"{r['itl_p50_ms']:.1f} | {r['itl_p99_ms']:.1f} | {ratio} | {batch} | {stacked} | {head} |")
    if any(result.get("micro_batches") for result in results):
        print(f"\nOne client, one greedy generate call of {args.batch_rows} rows split into k micro-batches "
              f"(tokens/s = rows x {args.new_tokens} / the call's wall time, prefill included)")
        print("\n| model | micro_batches | k | batching | tokens/s | ms per step |")
        print("|---|---|---|---|---|---|")
        for result in results:
            for r in result.get("micro_batches", []):
                print(f"| {result['model']} | {r['setting']} | {r['k']} | {r['mode']} | {r['tokens_per_s']:.1f} | "
                      f"{r['ms_per_step']:.1f} |")
    if any(result["long_prompt"] for result in results):
        print(f"\nRunning sessions' ITL while a {args.long_prompt}-token prompt arrives ({args.running} running; "
              "during = from its arrival to its first token; before = the second before it)")
        print("\n| model | batching | prefill s | ITL p50 before | ITL p99 before | ITL p50 during | ITL p99 during "
              "| ITL max during |")
        print("|---|---|---|---|---|---|---|---|")
        for result in results:
            for mode, r in result["long_prompt"].items():
                print(f"| {result['model']} | {mode} | {r['prefill_s']:.2f} | {r['before_p50_ms']:.1f} | "
                      f"{r['before_p99_ms']:.1f} | {r['during_p50_ms']:.1f} | {r['during_p99_ms']:.1f} | "
                      f"{r['during_max_ms']:.1f} |")


def interrupt(signum, frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="tiny,smollm2", help="comma-separated: tiny, smollm2 or a model dir")
    parser.add_argument("--sessions", default="1,8,32,64", help="concurrency levels")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1, help="torch threads in this process and in each peer")
    parser.add_argument("--long-prompt", type=int, default=1024, help="tokens of the arriving prompt (0: skip)")
    parser.add_argument("--running", type=int, default=8, help="sessions decoding while the long prompt arrives")
    parser.add_argument("--batch-rows", type=int, default=32, help="rows of the one-call micro-batch test (0: skip)")
    parser.add_argument("--micro-batches", default="1,2,3,4,auto", help="micro_batches settings for that test")
    parser.add_argument("--spot-check", type=float, default=0.0,
                        help="clients' spot-check rate (swarm/spot_check.py; its cost: bench_spot_check.py)")
    parser.add_argument("--peer-args", default="", help="extra molink-peer join arguments for both swarms")
    parser.add_argument("--out", default=str(ROOT / "bench_results" / "throughput.json"))
    args = parser.parse_args()
    args.sessions = [int(n) for n in args.sessions.split(",")]
    args.micro_batches = [m if m == "auto" else int(m) for m in args.micro_batches.split(",")]

    torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    signal.signal(signal.SIGTERM, interrupt)  # unwinds like Ctrl-C: every process started here is stopped
    workroot = Path(tempfile.mkdtemp(prefix="molink-bench-throughput-"))
    git = git_state()
    results = []
    try:
        for name in args.models.split(","):
            with contextlib.ExitStack() as stack:
                results.append(bench_model(name, model_dir_for(name, workroot), args, stack, workroot))
                args.finished = list(results)
            log(f"{name}: swarms stopped")
    except KeyboardInterrupt:
        log("interrupted: every process started here has been stopped")
        sys.exit(130)
    finally:
        shutil.rmtree(workroot, ignore_errors=True)
    print_tables(results, args)
    meta = {key: getattr(args, key) for key in ("sessions", "new_tokens", "prompt_tokens", "threads", "long_prompt",
                                                "running", "batch_rows", "micro_batches", "spot_check", "peer_args")}
    meta.update(cpu_count=os.cpu_count(), torch=torch.__version__, python=platform.python_version(), git=git,
                loadavg_after=loadavg(), time=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
