"""A MoLink swarm on a WanBed, and the client-side work that must run inside the client's namespace.

`start_swarm(bed, model_dir, spans, workdir)` starts `molink-peer bootstrap` on host "boot" and one
`molink-peer join --blocks A:B` per span on hosts p0, p1, ..., each listening on its own bed
address, waits for their ready files and returns the bootstrap multiaddr. The bed stops them.

Inside the client namespace (started by `bed.run("client", [python, wan_swarm.py, MODE, JSON])`):
  - `generate`: one greedy generation through the swarm; prints {"tokens": [...]} (the WAN test);
  - `bench`: the measurements of scripts/bench_wan.py. Counters live with the bed's owner, so the
    worker asks for them over its pipes: it writes {"op": "stats"} on stdout and reads one JSON
    line back; the result is the last line, {"op": "result", ...}.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

READY_TIMEOUT = 300.0  # peers joining over a 200 ms, 1 %-loss link need many round trips


def wait_ready(workdir: Path, host: str, proc, ready: Path) -> str:
    """A started peer's multiaddr once its ready file appears; its log tail if it dies first."""
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        if ready.exists():
            return ready.read_text().strip()
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    tail = (workdir / f"{host}.log").read_text(errors="replace").splitlines()[-20:]
    raise RuntimeError(f"{host} not ready (exit {proc.poll()}):\n" + "\n".join(tail))


def node_env(threads: int, extra: dict | None = None) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1", **(extra or {})}


def spawn_node(bed, workdir: Path, host: str, args: list[str], env: dict):
    """`molink-peer ARGS` in host's namespace, listening on its bed address; (host, process, ready file)."""
    ready = workdir / f"{host}.addr"
    ready.unlink(missing_ok=True)
    with open(workdir / f"{host}.log", "ab") as log:
        # own session: Ctrl-C reaches only the owner, which stops the peers in order
        proc = bed.run(host, [sys.executable, "-m", "molink.peer.cli", *args, "--listen",
                              f"/ip4/{bed.addr(host)}/tcp/0", "--ready-file", str(ready)],
                       stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                       start_new_session=True)
    return host, proc, ready


def start_swarm(bed, model_dir, spans, workdir: Path, threads: int = 1, extra_args=()) -> str:
    workdir.mkdir(parents=True, exist_ok=True)
    env = node_env(threads)

    def wait(host, proc, ready) -> str:
        return wait_ready(workdir, host, proc, ready)

    boot = wait(*spawn_node(bed, workdir, "boot", ["bootstrap"], env))
    peers = [spawn_node(bed, workdir, f"p{i}", ["join", "--model", str(model_dir), "--blocks", f"{a}:{b}",
                                                "--initial-peers", boot, *extra_args], env)
             for i, (a, b) in enumerate(spans)]
    for peer in peers:
        wait(*peer)
    return boot


# ---------------------------------------------------------------------- inside the client namespace
class TimingStreamer:
    """put() timestamps: put 1 is the prompt, put 2 the first new token, then one per decode step."""

    def __init__(self):
        self.stamps: list[float] = []

    def put(self, value) -> None:
        self.stamps.append(time.perf_counter())

    def end(self) -> None:
        pass


class Pipe:
    """Ask the bed's owner for link counters (the only channel out of the namespace is stdio)."""

    def __init__(self):
        self.out = os.fdopen(os.dup(1), "w")
        os.dup2(2, 1)  # anything else printed to stdout (libraries) goes to stderr, not into the protocol

    def stats(self) -> dict:
        self.out.write(json.dumps({"op": "stats"}) + "\n")
        self.out.flush()
        return json.loads(sys.stdin.readline())

    def send(self, payload: dict) -> None:
        self.out.write(json.dumps(payload) + "\n")
        self.out.flush()


def delta(after: dict, before: dict) -> dict:
    return {k: v["bytes"] - before.get(k, {"bytes": 0})["bytes"] for k, v in after.items()}


def median_dict(dicts: list[dict]) -> dict:
    return {k: statistics.median(d.get(k, 0) for d in dicts) for k in set().union(*dicts)}


def prompt_of(length: int, vocab: int, seed: int = 0):
    import torch

    return torch.randint(3, min(400, vocab), (1, length), generator=torch.Generator().manual_seed(seed))


def reference(model_dir, prompt, new_tokens: int) -> list[int]:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).train(False)
    with torch.inference_mode():
        out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                             max_new_tokens=new_tokens, eos_token_id=None, pad_token_id=0)
    return out[0].tolist()


def in_process(cfg: dict, prompts: dict) -> dict:
    """The compute floor: the same spans in this process (no network), each span's step timed."""
    from molink.swarm import LocalSpansModelForCausalLM

    model = LocalSpansModelForCausalLM.from_pretrained(cfg["model_dir"], [tuple(s) for s in cfg["spans"]],
                                                       progress=False)
    model.generation_config.eos_token_id = None
    calls: list[list[float]] = [[] for _ in model.spans]
    for i, span in enumerate(model.spans):
        def timed(*args, _step=span.step, _i=i):
            started = time.perf_counter()
            try:
                return _step(*args)
            finally:
                calls[_i].append(1000 * (time.perf_counter() - started))
        span.step = timed
    n, result = cfg["new_tokens"], {}
    runs, spans_ms = [], []

    def decode_run() -> float:
        """One in-process decode run: ms/token (spans' own times go to spans_ms)."""
        for c in calls:
            c.clear()
        streamer = TimingStreamer()
        model.generate(prompts["decode"], do_sample=False, max_new_tokens=n + 1, streamer=streamer)
        spans_ms.append([statistics.mean(c[1:]) for c in calls])  # c[0] is the prefill
        return 1000 * statistics.mean(b - a for a, b in zip(streamer.stamps[2:], streamer.stamps[3:]))

    for repeat in range(cfg["repeats"] + 1):
        runs.append(decode_run())
    runs, spans_ms[:] = runs[1:], spans_ms[1:]  # the first run warms up
    result["decode_ms"] = statistics.median(runs)
    result["decode_span_ms"] = [statistics.median(s[i] for s in spans_ms) for i in range(len(calls))]
    for length in cfg["prompt_lengths"]:
        ttfts, spans_ms = [], []
        for repeat in range(cfg["repeats"] + 1):
            for c in calls:
                c.clear()
            streamer = TimingStreamer()
            started = time.perf_counter()
            model.generate(prompts[length], do_sample=False, max_new_tokens=1, streamer=streamer)
            if repeat:
                ttfts.append(1000 * (streamer.stamps[1] - started))
                spans_ms.append([c[0] for c in calls])
        result[f"ttft_{length}_ms"] = statistics.median(ttfts)
        result[f"prefill_{length}_span_ms"] = [statistics.median(s[i] for s in spans_ms) for i in range(len(calls))]
    return result, decode_run


def swarm_mode(model, cfg: dict, prompts: dict, pipe: Pipe, mode: str, local_decode) -> dict:
    import torch

    from molink.swarm.generation import generate_with_chain, merged_generation_config

    model.relay = mode == "relay"
    n, repeats = cfg["new_tokens"], cfg["repeats"]
    model.generate(prompts["decode"], do_sample=False, max_new_tokens=4)  # warm-up (routes, connections)
    runs, steps_all, full_bytes, base_bytes, tokens, local = [], [], [], [], None, []
    for _ in range(repeats):
        # the compute floor, measured right before: a busy 2-core machine moves it from run to run
        local.append(local_decode())
        before = pipe.stats()
        streamer = TimingStreamer()
        out = model.generate(prompts["decode"], do_sample=False, max_new_tokens=n + 1, streamer=streamer)
        full_bytes.append(delta(pipe.stats(), before))
        steps = [1000 * (b - a) for a, b in zip(streamer.stamps[2:], streamer.stamps[3:])]
        runs.append(statistics.mean(steps))
        steps_all += steps
        tokens = out[0].tolist()
        before = pipe.stats()
        model.generate(prompts["decode"], do_sample=False, max_new_tokens=1)  # prefill only: the baseline
        base_bytes.append(delta(pipe.stats(), before))
    full, base = median_dict(full_bytes), median_dict(base_bytes)
    result = {"decode_runs_ms": runs, "decode_ms": statistics.median(runs), "decode_tokens": tokens,
              "compute_runs_ms": local, "compute_ms": statistics.median(local),
              "decode_p90_ms": sorted(steps_all)[int(0.9 * (len(steps_all) - 1))],
              "bytes_per_token": {k: (full[k] - base.get(k, 0)) / n for k in full}}

    async def ttft_opened(ids, streamer, snap):
        """TTFT with the session already open: the part the floor describes."""
        config = merged_generation_config(model.generation_config, do_sample=False, max_new_tokens=1)
        chain = await model.open_chain(1, ids.shape[1] + 1)
        try:
            await chain._reopen()  # opens the route now (normally done by the first step)
            before = snap()
            started = time.perf_counter()
            out = await generate_with_chain(model.head, chain, ids, torch.ones_like(ids), config, streamer)
            elapsed = 1000 * (streamer.stamps[1] - started)
            chunks.append(len(chain.history))  # how the prompt travelled (swarm/prefill_plan.py)
            return elapsed, delta(snap(), before), out[0].tolist()
        finally:
            await chain.close()

    for length in cfg["prompt_lengths"]:
        opened, full, link_bytes, chunks = [], [], [], []
        for _ in range(repeats):
            ms, used, out = model._run(ttft_opened, prompts[length], TimingStreamer(), pipe.stats)
            opened.append(ms)
            link_bytes.append(used)
            streamer = TimingStreamer()
            started = time.perf_counter()
            model.generate(prompts[length], do_sample=False, max_new_tokens=1, streamer=streamer)
            full.append(1000 * (streamer.stamps[1] - started))
        result[f"ttft_{length}"] = {"opened_ms": statistics.median(opened), "opened_runs_ms": opened, "chunks": chunks,
                                    "with_open_ms": statistics.median(full), "with_open_runs_ms": full,
                                    "bytes": median_dict(link_bytes), "first_token": out[-1]}
    result["route"] = [hop.peer_id[-8:] for hop in model.last_route]
    return result


def client_main(mode: str, cfg: dict) -> None:
    import torch

    torch.set_num_threads(cfg.get("threads", 1))
    from transformers.utils import logging as hf_logging

    from molink.peer.checkpoint import load_config
    from molink.swarm import DistributedModelForCausalLM

    hf_logging.set_verbosity_error()
    pipe = Pipe()
    vocab = load_config(cfg["model_dir"]).vocab_size
    if mode == "generate":
        prompt = prompt_of(cfg.get("prompt_tokens", 12), vocab)
        with DistributedModelForCausalLM.from_pretrained(cfg["model_dir"], cfg["initial_peers"],
                                                      spot_check=cfg.get("spot_check")) as model:
            model.generation_config.eos_token_id = None
            out = model.generate(prompt, do_sample=False, max_new_tokens=cfg["new_tokens"])
        pipe.send({"op": "result", "prompt": prompt[0].tolist(), "tokens": out[0].tolist()})
        return
    if mode == "throughput":
        pipe.send({"op": "result", "levels": throughput_levels(cfg, vocab)})
        return
    prompts = {"decode": prompt_of(cfg["decode_prompt_tokens"], vocab)}
    prompts.update({n: prompt_of(n, vocab, seed=n) for n in cfg["prompt_lengths"]})
    result = {"reference_decode": reference(cfg["model_dir"], prompts["decode"], cfg["new_tokens"] + 1),
              "reference_first": {n: reference(cfg["model_dir"], prompts[n], 1)[-1] for n in cfg["prompt_lengths"]}}
    print("[wan client] in-process spans", file=sys.stderr, flush=True)
    result["in_process"], local_decode = in_process(cfg, prompts)
    with DistributedModelForCausalLM.from_pretrained(cfg["model_dir"], cfg["initial_peers"],
                                                      spot_check=cfg.get("spot_check")) as model:
        model.generation_config.eos_token_id = None
        for mode_name in cfg["modes"]:
            print(f"[wan client] swarm {mode_name}", file=sys.stderr, flush=True)
            result[mode_name] = swarm_mode(model, cfg, prompts, pipe, mode_name, local_decode)
    pipe.send({"op": "result", **result})


def throughput_levels(cfg: dict, vocab: int) -> list[dict]:
    """bench_wan_throughput.py's client: each level of concurrent sessions from a client that
    bundles steps (swarm/step_bundles.py) and from one that does not, one after the other."""
    from bench_throughput import prompts_for, run_sessions, steady_metrics

    from molink.swarm import DistributedModelForCausalLM

    levels = []
    models = {mode: DistributedModelForCausalLM.from_pretrained(cfg["model_dir"], cfg["initial_peers"],
                                                               spot_check=cfg.get("spot_check"))
              for mode in ("bundled", "no cohorts", "unbundled")}
    try:
        models["unbundled"].step_bundles = None
        models["no cohorts"].step_bundles.cohorts = None  # bundles, but no cohort gate (swarm/cohorts.py)
        for model in models.values():
            model.generation_config.eos_token_id = None
            run_sessions(model, prompts_for(2, cfg["prompt_tokens"], vocab, 0), 4)  # warm-up
        for n in cfg["sessions"]:
            for mode, model in models.items():
                started = time.perf_counter()
                gate = model.step_bundles.cohorts if model.step_bundles else None
                held = gate.held if gate else 0
                stamps = run_sessions(model, prompts_for(n, cfg["prompt_tokens"], vocab, seed=n), cfg["new_tokens"])
                levels.append({"sessions": n, "mode": mode, **steady_metrics(stamps),
                               "wall_s": time.perf_counter() - started,
                               "cohort_holds": (gate.held - held) if gate else None})
                print(f"[wan client] {n} sessions {mode}: {levels[-1]['tokens_per_s']:.1f} tok/s, "
                      f"ITL p50 {levels[-1]['itl_p50_ms']:.1f} ms", file=sys.stderr, flush=True)
    finally:
        for model in models.values():
            model.close()
    return levels


def run_client(bed, mode: str, cfg: dict, timeout: float = 3600.0) -> dict:
    """Run client_main inside the bed's "client" namespace, answering its counter requests."""
    proc = bed.run("client", [sys.executable, str(Path(__file__).resolve()), mode, json.dumps(cfg)],
                   stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, start_new_session=True,
                   env={**os.environ, "OMP_NUM_THREADS": str(cfg.get("threads", 1))})
    watchdog = threading.Timer(timeout, proc.kill)  # a hung worker must not hang its owner
    watchdog.start()
    try:
        for line in proc.stdout:
            message = json.loads(line)
            if message["op"] == "stats":
                proc.stdin.write(json.dumps(bed.stats(hosts=False)["links"]) + "\n")
                proc.stdin.flush()
            elif message["op"] == "result":
                return message
        raise RuntimeError(f"client worker ended without a result (exit {proc.wait()}; killed after "
                           f"{timeout:.0f} s if negative)")
    finally:
        watchdog.cancel()
        if proc.poll() is None:
            proc.kill()
        proc.wait()


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    client_main(sys.argv[1], json.loads(sys.argv[2]))
