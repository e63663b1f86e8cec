"""Decode latency (ms/token, batch 1, greedy): transformers vs in-process spans vs the swarm on loopback.

    python scripts/bench_latency.py [--models tiny,smollm2] [--new-tokens 64] [--prompt-tokens 16]
                                    [--repeats 5] [--threads 1] [--profile] [--out bench_results/latency.json]

Setups, all fp32 on CPU, every process limited to --threads torch threads:
  - `transformers`: AutoModelForCausalLM.generate, full model, this process (the baseline);
  - `spans xK`: LocalSpansModelForCausalLM with K spans (K = 2, 3), this process, no network;
  - `swarm xK push|relay`: DistributedModelForCausalLM against a LocalSwarm of K peer processes
    (+ 1 bootstrap) on 127.0.0.1. push: hidden states go client -> peer0 -> ... -> last peer -> client;
    relay: the client sends every hop its input and waits for its output.

Only decode steps are timed: a streamer takes a timestamp at every token, and a run of
generate(max_new_tokens=N+1) gives N decode intervals after the first (prefill) token. Prefill,
DHT lookup and session opening are excluded. EOS is disabled so every run makes N+1 tokens. One
run = mean ms/token over its N steps; each setup is run --repeats times, the setups of a round
in a shuffled order (both swarms stay up the whole time), and the table reports the median run
with min/max over runs, and the p90 of all single-step intervals.

Per-hop overhead = (swarm ms/token - in-process spans ms/token with the same number of spans)
/ one-way network hops per token, where push has K+1 hops and relay 2K. CPU per decode step is
measured too (this process via process_time, each peer from /proc/<pid>/stat) between the first
and the last new token; "per-hop CPU" = (client + peers CPU - in-process CPU) / hops is the CPU
the network path adds, a figure that other load on a shared machine disturbs much less than wall
time (on a 2-core box a busy neighbour can double every wall-clock number).

--profile: afterwards, py-spy (`pip install py-spy`; not a project dependency) samples one peer
of the 3-peer swarm and this client process while push-mode generations run, and the top frames
and a breakdown by category (torch compute, wire codec, Noise, yamux, trio, ...) are printed and
saved. The profiled run's ms/token is reported too, since sampling itself costs CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch

from molink.peer.low_latency import low_latency_for_benchmark

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

SPAN_COUNTS = (2, 3)
RETRIES = 2  # a failed generation (e.g. a stream that did not open) is retried, logged and counted


def log(message: str) -> None:
    print(f"[latency] {message}", file=sys.stderr, flush=True)


def model_dirs(names: list[str], tmp: Path) -> dict[str, Path]:
    dirs = {}
    for name in names:
        if name == "tiny":
            from make_tiny_model import make_tiny_model

            dirs[name] = make_tiny_model("llama", tmp / "tiny", layers=6)  # make_tiny_model's defaults
        elif name == "smollm2":
            from molink.swarm.default_model import convert_smollm2

            dirs[name] = convert_smollm2()
        else:
            dirs[name] = Path(name)
    return dirs


CLOCK_TICK = os.sysconf("SC_CLK_TCK")


def process_cpu_seconds(pid: int) -> float:
    """utime + stime of a whole process (all its threads, live or exited), from /proc (clock ticks)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICK


class CpuMeter:
    """CPU seconds used by this process and by some other processes between start() and stop()."""

    def __init__(self, pids: list[int]):
        self.pids = pids
        self.client = self.peers = 0.0

    def _read(self) -> tuple[float, float]:
        return time.process_time(), sum(process_cpu_seconds(pid) for pid in self.pids)

    def start(self) -> None:
        self._started = self._read()

    def stop(self) -> None:
        client, peers = self._read()
        self.client, self.peers = client - self._started[0], peers - self._started[1]


class TimingStreamer:
    """A transformers-compatible streamer that records when each put() happens (and CPU between the
    first new token and the last, when given a meter and how many puts to expect)."""

    def __init__(self, expected_puts: int | None = None, meter: CpuMeter | None = None):
        self.stamps: list[float] = []
        self.expected_puts, self.meter = expected_puts, meter

    def put(self, value) -> None:
        self.stamps.append(time.perf_counter())
        if self.meter is not None:
            if len(self.stamps) == 2:  # put 1 is the prompt, put 2 the first new token (end of prefill)
                self.meter.start()
            elif len(self.stamps) == self.expected_puts:
                self.meter.stop()

    def end(self) -> None:
        pass


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = (len(ordered) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


class Setup:
    """One thing to time: `generate(prompt, streamer)` -> output ids."""

    def __init__(self, name: str, generate, hops: int = 0, spans: int | None = None, mode: str | None = None,
                 before=None, peer_pids: list[int] = ()):
        self.name, self.generate, self.hops, self.spans, self.mode = name, generate, hops, spans, mode
        self.before = before  # called before each run (the swarm client's relay flag)
        self.peer_pids = list(peer_pids)
        self.runs_ms: list[float] = []
        self.steps_ms: list[float] = []
        self.client_cpu_s = self.peers_cpu_s = 0.0
        self.timed_steps = 0
        self.failures: list[str] = []
        self.tokens_match: bool | None = None

    def run(self, prompt: torch.Tensor, new_tokens: int) -> tuple[float, torch.Tensor, list[float], CpuMeter]:
        """One generation; returns (mean ms per decode step, output ids, every step's ms, its CPU)."""
        if self.before:
            self.before()
        for attempt in range(1, RETRIES + 2):
            meter = CpuMeter(self.peer_pids)
            streamer = TimingStreamer(new_tokens + 2, meter)
            try:
                out = self.generate(prompt, new_tokens + 1, streamer)
                break
            except Exception as exc:  # a transient swarm failure: count it, report it, try again
                self.failures.append(f"{type(exc).__name__}: {exc}"[:300])
                log(f"  {self.name}: run failed after {max(0, len(streamer.stamps) - 1)} tokens "
                    f"(attempt {attempt}): {self.failures[-1][:200]}")
                if attempt > RETRIES:
                    raise
        stamps = streamer.stamps[-(new_tokens + 1):]  # the first put is the prompt
        if len(streamer.stamps) != new_tokens + 2 or out.shape[1] != prompt.shape[1] + new_tokens + 1:
            raise RuntimeError(f"{self.name}: expected {new_tokens + 1} new tokens, got {out.shape[1] - prompt.shape[1]}")
        steps = [1000 * (b - a) for a, b in zip(stamps, stamps[1:])]
        return sum(steps) / len(steps), out, steps, meter

    def record(self, ms: float, steps: list[float], meter: CpuMeter) -> None:
        self.runs_ms.append(ms)
        self.steps_ms.extend(steps)
        self.client_cpu_s += meter.client
        self.peers_cpu_s += meter.peers
        self.timed_steps += len(steps)

    def summary(self) -> dict:
        return {"setup": self.name, "mode": self.mode, "spans": self.spans, "hops": self.hops,
                "median_ms": statistics.median(self.runs_ms), "min_ms": min(self.runs_ms),
                "max_ms": max(self.runs_ms), "step_p50_ms": percentile(self.steps_ms, 50),
                "step_p90_ms": percentile(self.steps_ms, 90), "runs_ms": self.runs_ms,
                # CPU per decode step over all timed runs: this process (all threads) and all peers
                "client_cpu_ms": 1000 * self.client_cpu_s / self.timed_steps,
                "peers_cpu_ms": 1000 * self.peers_cpu_s / self.timed_steps if self.peer_pids else None,
                "tokens_match_transformers": self.tokens_match, "failed_runs": self.failures}


def transformers_setup(model_dir: Path) -> Setup:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).train(False)
    model.generation_config.eos_token_id = None  # always make every token asked for
    pad = model.generation_config.pad_token_id
    pad = 0 if pad is None else pad

    @torch.inference_mode()
    def generate(prompt, max_new_tokens, streamer):
        return model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                              max_new_tokens=max_new_tokens, pad_token_id=pad, streamer=streamer)

    return Setup("transformers", generate)


def swarm_model_generate(model):
    model.generation_config.eos_token_id = None

    def generate(prompt, max_new_tokens, streamer):
        return model.generate(prompt, do_sample=False, max_new_tokens=max_new_tokens, streamer=streamer)

    return generate


def start_swarm(stack: contextlib.ExitStack, model_dir: Path, spans: list[tuple[int, int]], threads: int,
                workdir: Path):
    from molink.swarm.local_swarm import LocalSwarm

    swarm = LocalSwarm(model_dir, spans, workdir=workdir, torch_threads=threads)
    stack.callback(swarm.stop)  # registered first: stops the processes even if start() is interrupted
    started = time.perf_counter()
    swarm.start(progress=lambda peer: log(f"  {peer.name} blocks {peer.blocks} ready (pid {peer.pid})"))
    log(f"  swarm of {len(spans)} peers up in {time.perf_counter() - started:.1f} s")
    return swarm


def bench_model(name: str, model_dir: Path, args, stack: contextlib.ExitStack, workroot: Path) -> dict:
    from molink.peer.checkpoint import load_config
    from molink.swarm import DistributedModelForCausalLM, LocalSpansModelForCausalLM
    from molink.swarm.model import even_boundaries
    from molink.swarm.spot_check import DEFAULT_RATE, SpotCheckConfig

    config = load_config(model_dir)
    layers = config.num_hidden_layers
    prompt = torch.randint(3, min(400, config.vocab_size), (1, args.prompt_tokens),
                           generator=torch.Generator().manual_seed(0))
    log(f"{name}: loading transformers model and in-process spans")
    setups = [transformers_setup(model_dir)]
    for k in SPAN_COUNTS:
        local = LocalSpansModelForCausalLM.from_pretrained(model_dir, even_boundaries(layers, k), progress=False)
        setups.append(Setup(f"spans x{k} in-process", swarm_model_generate(local), spans=k,
                            mode="in-process"))
    swarms = {}
    for k in SPAN_COUNTS:
        spans = even_boundaries(layers, k)
        log(f"{name}: starting a swarm of {k} peers {spans}")
        swarm = start_swarm(stack, model_dir, spans, args.threads, workroot / f"{name}-swarm{k}")
        client = stack.enter_context(DistributedModelForCausalLM.from_pretrained(model_dir, swarm.initial_peers))
        swarms[k] = (swarm, client)
        generate = swarm_model_generate(client)
        # the transport alone (spot checks off); with k = 3 also the default spot checks, whose
        # per-step cost here is the taps (no replicas: nothing to re-run)
        variants = [("push", 0.0), ("relay", 0.0)] + ([("push", DEFAULT_RATE)] if k == max(SPAN_COUNTS) else [])
        for mode, rate in variants:
            def before(client=client, relay=(mode == "relay"), rate=rate):
                client.relay = relay
                client.spot_check = SpotCheckConfig(rate=rate)

            label = f"swarm x{k} {mode}" + (f" spot checks {rate:g}" if rate else "")
            setups.append(Setup(label, generate, hops=(k + 1) if mode == "push" else 2 * k,
                                spans=k, mode=mode, before=before, peer_pids=[p.pid for p in swarm.peers]))

    log(f"{name}: warm-up and token check (one untimed run per setup)")
    loadavg_before = loadavg()
    reference = None
    for setup in setups:
        _, out, _, _ = setup.run(prompt, args.new_tokens)
        reference = out if reference is None else reference  # setups[0] is transformers
        setup.tokens_match = bool(torch.equal(out, reference))
        if setup.mode in ("push", "relay"):
            route = swarms[setup.spans][1].last_route
            if len(route) != setup.spans:
                raise RuntimeError(f"{setup.name}: route has {len(route)} hops, expected {setup.spans}")
    order_rng = random.Random(args.seed)
    for round_index in range(args.repeats):
        order = setups[:]
        order_rng.shuffle(order)
        for setup in order:
            ms, _, steps, meter = setup.run(prompt, args.new_tokens)
            setup.record(ms, steps, meter)
        log(f"{name}: round {round_index + 1}/{args.repeats}: " +
            ", ".join(f"{s.name} {s.runs_ms[-1]:.2f}" for s in setups) + " ms/token")
    rows = [s.summary() for s in setups]
    by_name = {r["setup"]: r for r in rows}
    for r in rows:
        if r["mode"] in ("push", "relay"):
            base = by_name[f"spans x{r['spans']} in-process"]["median_ms"]
            r["delta_vs_spans_ms"] = r["median_ms"] - base
            r["per_hop_ms"] = r["delta_vs_spans_ms"] / r["hops"]
            base3 = by_name["spans x3 in-process"]["median_ms"]
            r["per_hop_ms_vs_3_spans"] = (r["median_ms"] - base3) / r["hops"]
            # the same on CPU time, which other load on the machine disturbs far less than wall time
            cpu_base = by_name[f"spans x{r['spans']} in-process"]["client_cpu_ms"]
            r["extra_cpu_ms"] = r["client_cpu_ms"] + r["peers_cpu_ms"] - cpu_base
            r["per_hop_cpu_ms"] = r["extra_cpu_ms"] / r["hops"]
    result = {"model": name, "model_dir": str(model_dir), "layers": layers, "hidden_size": config.hidden_size,
              "loadavg_before": loadavg_before, "loadavg_after": loadavg(), "rows": rows}
    if args.profile:
        swarm, client = swarms[max(SPAN_COUNTS)]
        result["profile"] = profile_swarm(name, swarm, client, prompt, args)
    return result


# ---------------------------------------------------------------------------- profiling


# (category, markers in a frame "function (file)"); a sample goes to the category of the frame
# nearest its leaf that matches any marker, i.e. roughly where the CPU was when it was sampled.
CATEGORY_RULES = [
    ("waiting in epoll (trio idle)", ("get_events (trio/_core/_io_epoll.py)",)),
    ("socket send/recv syscalls", ("trio/_socket.py", "trio/_highlevel_socket.py")),
    ("torch compute (blocks, head)", ("torch/", "transformers/", "peer/span.py", "families/", "client_head.py")),
    ("Noise encryption", ("security/noise", "cryptography/", "nacl/")),
    ("yamux muxer", ("stream_muxer/",)),
    ("wire codec (msgpack, tensors)", ("dht/wire.py", "msgpack", "peer/protocol.py")),
    ("libp2p / multiaddr other", ("libp2p/", "multiaddr/")),
    ("molink streams, session, handler, generation", ("dht/", "swarm/", "peer/")),
    ("thread hand-off (to_thread / from_thread)", ("trio/_threads.py", "threading.py", "queue.py")),
    ("trio scheduler", ("trio/", "outcome/")),
]


def categorize(frames: list[str]) -> str:
    for frame in reversed(frames):
        for label, markers in CATEGORY_RULES:
            if any(m in frame for m in markers):
                return label
    return "other"


# entry points that every sample of a process passes through: not worth listing
ROOT_FRAMES = ("<module> ", "main ", "run_join ", "BackgroundLoop._main ", "BackgroundLoop._root ",
               "PeerServer.serve ")


def parse_raw(path: Path) -> list[tuple[list[str], int]]:
    stacks = []
    if not path.exists():
        return stacks
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        stacks.append((stack.split(";"), int(count)))
    return stacks


def summarize_profile(path: Path, seconds: float, rate: int, top: int) -> dict:
    stacks = parse_raw(path)
    total = sum(c for _, c in stacks)
    if total == 0:
        return {"samples": 0}
    self_frames, inclusive, categories, threads = Counter(), Counter(), Counter(), Counter()
    for frames, count in stacks:
        thread, frames = (frames[0], frames[1:]) if frames and frames[0].startswith(("thread", "process")) \
            else ("", frames)
        threads[thread] += count
        if frames:
            self_frames[frames[-1]] += count
        for f in set(frames):
            inclusive[f] += count
        categories[categorize(frames)] += count
    pct = lambda c: round(100 * c / total, 1)  # noqa: E731
    return {
        "samples": total, "seconds": seconds, "rate": rate,
        # samples of non-idle threads; with several busy threads this can pass 100 %
        "busy_pct_of_one_core": round(100 * total / (seconds * rate), 1),
        "threads": {t: pct(c) for t, c in threads.most_common()},
        "categories_pct": {k: pct(c) for k, c in categories.most_common()},
        "top_self_pct": [(f, pct(c)) for f, c in self_frames.most_common(top)],
        "top_inclusive_pct": [(f, pct(c)) for f, c in inclusive.most_common(top * 3)],
        "hot_molink_pct": [(f, pct(c)) for f, c in inclusive.most_common()
                           if f.split(" (")[-1].startswith(("dht/", "swarm/", "peer/"))
                           and not f.startswith(ROOT_FRAMES)][:top],
    }


def py_spy_binary() -> str | None:
    candidate = Path(sys.executable).parent / "py-spy"
    return str(candidate) if candidate.exists() else shutil.which("py-spy")


def profile_swarm(name: str, swarm, client, prompt: torch.Tensor, args) -> dict:
    spy = py_spy_binary()
    if spy is None:
        log("--profile: py-spy not found (install it with .venv/bin/pip install py-spy); skipping")
        return {"error": "py-spy not installed"}
    peer = swarm.peers[min(args.profile_peer, len(swarm.peers) - 1)]
    outdir = Path(tempfile.mkdtemp(prefix="molink-pyspy-"))
    targets = {f"{peer.name} (blocks {peer.blocks[0]}:{peer.blocks[1]}, pid {peer.pid})": peer.pid,
               f"client (pid {os.getpid()})": os.getpid()}
    client.relay = False
    generate = swarm_model_generate(client)
    generate(prompt, 2, None)  # open and close a session before sampling starts
    # long generations, so that opening sessions (DHT lookup, dials) is a small part of the samples
    tokens = max(args.new_tokens, args.profile_tokens)
    log(f"{name}: profiling {', '.join(targets)} for {args.profile_seconds:.0f} s (push mode, "
        f"{len(swarm.peers)} peers, generations of {tokens} tokens)")
    procs = {}
    try:
        for label, pid in targets.items():
            out = outdir / f"{pid}.txt"
            procs[label] = (out, subprocess.Popen(
                [spy, "record", "--pid", str(pid), "--duration", str(int(args.profile_seconds)), "--rate",
                 str(args.profile_rate), "--format", "raw", "--nolineno", "--threads", "--nonblocking",
                 "--output", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
        time.sleep(1.0)  # py-spy attaches
        runs, failures = [], []
        while any(p.poll() is None for _, p in procs.values()):
            streamer = TimingStreamer()
            try:
                generate(prompt, tokens + 1, streamer)
            except Exception as exc:
                failures.append(f"{type(exc).__name__}: {exc}"[:300])
                log(f"  profiled run failed: {failures[-1][:200]}")
                continue
            stamps = streamer.stamps[-(tokens + 1):]
            runs.append(1000 * (stamps[-1] - stamps[0]) / tokens)
    finally:
        for _, proc in procs.values():
            if proc.poll() is None:
                proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    result = {"mode": "push", "peers": len(swarm.peers), "tokens_per_generation": tokens, "failed_runs": failures,
              "profiled_runs_ms": runs, "profiled_median_ms": statistics.median(runs) if runs else None}
    for label, (out, proc) in procs.items():
        summary = summarize_profile(out, args.profile_seconds, args.profile_rate, args.profile_top)
        if summary.get("samples", 0) == 0:
            summary["error"] = (proc.stderr.read().decode(errors="replace")[-500:] if proc.stderr else "no samples")
        result[label] = summary
    shutil.rmtree(outdir, ignore_errors=True)
    return result


# ---------------------------------------------------------------------------- output


def print_tables(results: list[dict], args) -> None:
    print(f"\nDecode ms/token, batch 1, greedy, {args.prompt_tokens}-token prompt, {args.new_tokens} timed decode "
          f"steps x {args.repeats} runs (prefill excluded); torch threads per process: {args.threads}; "
          f"{os.cpu_count()} cores")
    print("\nms/token: median run [min–max over runs]; p90: 90th percentile of single decode steps. "
          "Per-hop overhead = (swarm − in-process spans with the same K) / one-way hops per token, "
          "hops: push = K+1 (client→peer0→…→peerK-1→client), relay = 2K (client⇄each peer). "
          "CPU: per decode step, this process (all threads) / all K peer processes together "
          "(/proc, 10 ms ticks, summed over every timed run); per-hop CPU = (client + peers CPU − "
          "in-process spans xK CPU) / hops, i.e. the CPU the network path adds, which other load on the "
          "machine disturbs far less than wall time.")
    print("\n| model | setup | hops | ms/token median [min–max] | step p90 ms | Δ vs spans xK ms | per-hop ms | "
          "CPU ms/token client / peers | per-hop CPU ms | tokens = transformers |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for result in results:
        for r in result["rows"]:
            delta = f"{r['delta_vs_spans_ms']:+.2f}" if "delta_vs_spans_ms" in r else ""
            hop = f"{r['per_hop_ms']:.2f}" if "per_hop_ms" in r else ""
            cpu = f"{r['client_cpu_ms']:.2f}" + (f" / {r['peers_cpu_ms']:.2f}" if r["peers_cpu_ms"] is not None else "")
            hop_cpu = f"{r['per_hop_cpu_ms']:.2f}" if "per_hop_cpu_ms" in r else ""
            print(f"| {result['model']} | {r['setup']} | {r['hops'] or ''} | {r['median_ms']:.2f} "
                  f"[{r['min_ms']:.2f}–{r['max_ms']:.2f}] | {r['step_p90_ms']:.2f} | {delta} | {hop} | {cpu} | {hop_cpu} | "
                  f"{'yes' if r['tokens_match_transformers'] else 'NO'} |")
    failed = [(result["model"], r["setup"], len(r["failed_runs"])) for result in results for r in result["rows"]
              if r["failed_runs"]]
    if failed:
        print("\nfailed runs (retried; the table holds only complete runs): " +
              ", ".join(f"{m} {s}: {n}" for m, s, n in failed) + " (messages in the JSON)")
    print("\nload average (1/5/15 min) on this machine, before/after the timed runs: " +
          "; ".join(f"{r['model']} {r['loadavg_before']} / {r['loadavg_after']}" for r in results))
    for result in results:
        profile = result.get("profile")
        if not profile or "error" in profile:
            continue
        print(f"\nProfile ({result['model']}, swarm x{profile['peers']} push, py-spy --nonblocking at "
              f"{args.profile_rate} Hz): ms/token while sampled: median "
              f"{profile['profiled_median_ms']:.2f} over {len(profile['profiled_runs_ms'])} runs")
        for label, summary in profile.items():
            if not isinstance(summary, dict) or "samples" not in summary:
                continue
            if summary["samples"] == 0:
                print(f"\n{label}: no samples ({summary.get('error', '')})")
                continue
            print(f"\n{label}: {summary['samples']} samples, busy {summary['busy_pct_of_one_core']:.0f} % of one "
                  f"core over {summary['seconds']:.0f} s; by thread: " +
                  ", ".join(f"{t or 'main'} {p} %" for t, p in summary["threads"].items()))
            print("\n| category | % samples |\n|---|---|")
            for cat, p in summary["categories_pct"].items():
                print(f"| {cat} | {p} |")
            print("\n| top self frame | % samples |\n|---|---|")
            for frame, p in summary["top_self_pct"]:
                print(f"| `{frame}` | {p} |")
            print("\n| MoLink function (inclusive) | % samples |\n|---|---|")
            for frame, p in summary["hot_molink_pct"]:
                print(f"| `{frame}` | {p} |")


def loadavg() -> str:
    """Other work on this machine shows up here (the numbers are only as quiet as the machine)."""
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return ""


def git_state() -> dict:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True)
        return {"commit": head.stdout.strip(), "dirty": bool(dirty.stdout.strip())}
    except OSError:
        return {}


def interrupt(signum, frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="tiny,smollm2", help="comma-separated: tiny, smollm2 or a model dir")
    parser.add_argument("--new-tokens", type=int, default=64, help="timed decode steps per run")
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5, help="runs per setup (interleaved, shuffled rounds)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads in this process and in each peer")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--profile", action="store_true", help="py-spy one peer and the client (swarm x3 push)")
    parser.add_argument("--profile-peer", type=int, default=1, help="index of the peer to profile (default: middle)")
    parser.add_argument("--profile-seconds", type=float, default=10.0)
    parser.add_argument("--profile-rate", type=int, default=200)
    parser.add_argument("--profile-top", type=int, default=10)
    parser.add_argument("--profile-tokens", type=int, default=256, help="new tokens per profiled generation")
    parser.add_argument("--low-latency", action="store_true",
                        help="hold a 0 us CPU wake-up bound (PM QoS, root) here and in every peer (peer/low_latency.py)")
    parser.add_argument("--out", default=str(ROOT / "bench_results" / "latency.json"))
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    # SIGTERM unwinds like Ctrl-C, so the ExitStack stops every peer process we started
    signal.signal(signal.SIGTERM, interrupt)
    workroot = Path(tempfile.mkdtemp(prefix="molink-bench-latency-"))
    git = git_state()  # the code the peers start with (others may edit the tree while this runs)
    results = []
    setting = contextlib.ExitStack()
    try:
        cpu_setting = setting.enter_context(low_latency_for_benchmark(args.low_latency))
        log(f"CPU latency setting: {cpu_setting}")
        dirs = model_dirs(args.models.split(","), workroot)
        for name, model_dir in dirs.items():
            with contextlib.ExitStack() as stack:  # clients closed, then swarms stopped, whatever happens
                results.append(bench_model(name, model_dir, args, stack, workroot))
            log(f"{name}: swarms stopped")
    except KeyboardInterrupt:
        log("interrupted: every process started here has been stopped")
        sys.exit(130)
    finally:
        setting.close()
        shutil.rmtree(workroot, ignore_errors=True)
    print_tables(results, args)
    print(f"CPU latency setting (the same for the baseline and the swarms): {cpu_setting}")
    meta = {"new_tokens": args.new_tokens, "prompt_tokens": args.prompt_tokens, "repeats": args.repeats,
            "threads": args.threads, "cpu_count": os.cpu_count(), "torch": torch.__version__,
            "python": platform.python_version(), "git": git, **cpu_setting,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "per_hop_definition": "(swarm - in-process spans with the same K) / hops; push K+1, relay 2K"}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
