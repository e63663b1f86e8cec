"""The swarm on a WAN test bed: decode ms/token and TTFT next to their physical floors.

    python scripts/bench_wan.py [--models tiny,smollm2] [--delay-ms 20] [--rate-mbit 100] [--loss 0.001]
                                [--new-tokens 32] [--repeats 3] [--prompts 128,1024] [--out bench_results/wan.json]

Needs root (scripts/wan_bed.py: network namespaces + a delay/rate/loss forwarder). Hosts: boot
(bootstrap), p0, p1, p2 (one span each, even split, `molink-peer join`), client; every pair of
hosts is a link with the given one-way delay, rate and loss in each direction. The client runs in
its own namespace (scripts/wan_swarm.py) and measures, for push (default) and relay mode:

  - decode: mean ms per decode step of a greedy generation (16-token prompt, --new-tokens steps
    after the first token), median over --repeats runs;
  - TTFT for each --prompts length: first token of a 1-token generation, timed from the first step
    with the session already open (what the floor describes), and also from generate() (adds
    route lookup + opening the session);
  - bytes on the wire per link (IP packets counted by the forwarder, headers, ACKs and
    retransmissions included): per decode token = (run with N+1 tokens - run with 1) / N.

Floors (all from measurements on this machine, 1 torch thread everywhere):
  decode floor  = in-process spans ms/token (the same 3 spans + client head in one process, no
                  network) + hops x delay + sum over hops of bytes per token / rate;
  TTFT serial   = in-process TTFT + hops x delay + sum over hops of prefill bytes / rate;
  TTFT overlapped = hops x delay + client head + max(slowest span's prefill, slowest hop's bytes /
                  rate): the best any chunked pipeline could do (every other stage hidden), with
                  a machine per host; on this machine's shared cores also the spans' total /
                  cores inside the max (the bed's hosts are namespaces of one machine).
hops: push = K+1 (client -> p0 -> p1 -> p2 -> client), relay = 2K (client <-> each peer).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

from wan_bed import WanBed, need_root  # noqa: E402
from wan_swarm import run_client, start_swarm  # noqa: E402

from molink.peer.low_latency import low_latency_for_benchmark  # noqa: E402

HOSTS = ["boot", "p0", "p1", "p2", "client"]
DECODE_GOAL, TTFT_GOAL = 1.10, 1.15


def log(message: str) -> None:
    print(f"[wan] {message}", file=sys.stderr, flush=True)


def model_dir(name: str, tmp: Path) -> Path:
    from make_tiny_model import bench_model_dir

    return bench_model_dir(name, tmp, positions=2048)  # room for the longest prompt


def hop_links(mode: str, peers: int) -> list[str]:
    chain = ["client", *[f"p{i}" for i in range(peers)], "client"]
    if mode == "push":
        return [f"{a}>{b}" for a, b in zip(chain, chain[1:])]
    return [link for i in range(peers) for link in (f"client>p{i}", f"p{i}>client")]


def link_bytes(counts: dict, link: str) -> float:
    """Bytes on `link`; with netem (per-host counters only) the sender's whole egress."""
    return counts.get(link, counts.get(link.split(">")[0] + ">*", 0))


def analyse(name: str, raw: dict, args, spans) -> dict:
    k, ms_per_byte = len(spans), 8 / (args.rate_mbit * 1e3) if args.rate_mbit else 0.0
    local = raw["in_process"]
    rows = []
    for mode in args.modes:
        r = raw[mode]
        links = hop_links(mode, k)
        hops = len(links)
        delays = hops * args.delay_ms
        fwd = [link_bytes(r["bytes_per_token"], link) for link in links]
        back = [link_bytes(r["bytes_per_token"], "{1}>{0}".format(*link.split(">"))) for link in links]
        compute = r.get("compute_ms", local["decode_ms"])  # in-process runs interleaved with this mode's
        floor = compute + delays + ms_per_byte * sum(fwd)
        row = {"mode": mode, "hops": hops, "route": r["route"], "decode_ms": r["decode_ms"],
               "decode_runs_ms": r["decode_runs_ms"], "decode_p90_ms": r["decode_p90_ms"],
               "compute_ms": compute, "compute_runs_ms": r.get("compute_runs_ms"),
               "span_compute_ms": sum(local["decode_span_ms"]),
               "delays_ms": delays, "transfer_ms": ms_per_byte * sum(fwd), "decode_floor_ms": floor,
               "decode_ratio": r["decode_ms"] / floor, "bytes_per_token_per_hop": dict(zip(links, fwd)),
               "reverse_bytes_per_token_per_hop": dict(zip(links, back)),
               "all_links_bytes_per_token": r["bytes_per_token"],
               "tokens_match": r["decode_tokens"] == raw["reference_decode"], "ttft": {}}
        for length in args.prompts:
            t = r[f"ttft_{length}"]
            prefill = [link_bytes(t["bytes"], link) for link in links]
            span_ms = local[f"prefill_{length}_span_ms"]
            head = local[f"ttft_{length}_ms"] - sum(span_ms)
            serial = local[f"ttft_{length}_ms"] + delays + ms_per_byte * sum(prefill)
            overlapped = delays + head + max(max(span_ms), ms_per_byte * max(prefill))
            # the bed's hosts share this machine's cores: its spans cannot all compute at once
            shared = delays + head + max(max(span_ms), sum(span_ms) / (os.cpu_count() or 1), ms_per_byte * max(prefill))
            row["ttft"][length] = {"opened_ms": t["opened_ms"], "with_open_ms": t["with_open_ms"],
                                   "opened_runs_ms": t["opened_runs_ms"], "with_open_runs_ms": t["with_open_runs_ms"],
                                   "compute_ms": local[f"ttft_{length}_ms"], "span_prefill_ms": span_ms,
                                   "bytes_per_hop": dict(zip(links, prefill)), "serial_floor_ms": serial,
                                   "overlapped_floor_ms": overlapped, "ratio": t["opened_ms"] / overlapped,
                                   "shared_cores_floor_ms": shared, "shared_cores_ratio": t["opened_ms"] / shared,
                                   "first_token_match": t["first_token"] == raw["reference_first"][str(length)],
                                   "chunks_per_run": t.get("chunks", [])}
        rows.append(row)
    return {"model": name, "spans": spans, "in_process": local, "rows": rows}


def bench_model(name: str, directory: Path, args, workroot: Path) -> dict:
    from molink.peer.checkpoint import load_config
    from molink.swarm.model import even_boundaries

    config = load_config(directory)
    spans = even_boundaries(config.num_hidden_layers, 3)
    sysctls = dict(item.split("=", 1) for item in args.sysctl)
    with WanBed(HOSTS, args.delay_ms, args.rate_mbit, args.loss, backend=args.backend, sysctls=sysctls,
                route_options=args.route.split()) as bed:
        log(f"{name}: bed up ({bed.backend}); starting bootstrap + 3 peers {spans}")
        started = time.perf_counter()
        boot = start_swarm(bed, directory, spans, workroot / name, threads=args.threads)
        log(f"{name}: swarm up in {time.perf_counter() - started:.1f} s; client measuring")
        cfg = {"model_dir": str(directory), "spans": spans, "initial_peers": [boot], "new_tokens": args.new_tokens,
               "repeats": args.repeats, "decode_prompt_tokens": 16, "prompt_lengths": args.prompts,
               "modes": args.modes, "threads": args.threads, "spot_check": args.spot_check}
        load_before = loadavg()
        raw = run_client(bed, "bench", cfg)
        load_after = loadavg()
        totals = bed.stats(hosts=False)["links"]
    result = analyse(name, raw, args, spans)
    result["hidden_size"], result["layers"] = config.hidden_size, config.num_hidden_layers
    # other work on this 2-core machine (other sessions' tests) shows here: numbers are only as quiet as it
    result["loadavg_before"], result["loadavg_after"] = load_before, load_after
    result["link_totals"] = totals  # whole run: packets, bytes, lost, queue drops per link
    return result


def print_tables(results: list[dict], args) -> None:
    print(f"\nWAN bed: {args.delay_ms} ms one-way, {args.rate_mbit} Mbit/s, {100 * args.loss:.2f} % loss per "
          f"direction on every link; bootstrap + 3 peers + client, each in its own netns; {args.threads} torch "
          f"thread per process; {os.cpu_count()} cores; {args.new_tokens} decode steps x {args.repeats} runs"
          + (f"; sysctls {', '.join(args.sysctl)}" if args.sysctl else "")
          + (f"; route options '{args.route}'" if args.route else "") + ".")
    print("\nDecode (ms/token; floor = in-process compute + hops x delay + bytes/rate):\n")
    print("| model | mode | hops | ms/token median [min–max] | p90 | compute (Σ spans) | delays | bytes/rate | "
          f"floor | ratio (goal ≤ {DECODE_GOAL}) | tokens = transformers |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for res in results:
        for r in res["rows"]:
            print(f"| {res['model']} | {r['mode']} | {r['hops']} | {r['decode_ms']:.1f} [{min(r['decode_runs_ms']):.1f}"
                  f"–{max(r['decode_runs_ms']):.1f}] | {r['decode_p90_ms']:.1f} | {r['compute_ms']:.2f} "
                  f"({r['span_compute_ms']:.2f}) | {r['delays_ms']:.0f} | {r['transfer_ms']:.2f} | "
                  f"{r['decode_floor_ms']:.1f} | {r['decode_ratio']:.3f} | {'yes' if r['tokens_match'] else 'NO'} |")
    print("\nTTFT (ms; measured from the first step with the session open; 'with open' adds route lookup "
          "and session opening):\n")
    print("| model | mode | prompt | TTFT | with open | compute (slowest span) | serial floor | overlapped floor | "
          f"ratio vs overlapped (goal ≤ {TTFT_GOAL}) | on {os.cpu_count()} shared cores: floor (ratio) | "
          "first token = transformers | chunks per run |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for res in results:
        for r in res["rows"]:
            for length, t in r["ttft"].items():
                print(f"| {res['model']} | {r['mode']} | {length} | {t['opened_ms']:.1f} | {t['with_open_ms']:.1f} | "
                      f"{t['compute_ms']:.1f} ({max(t['span_prefill_ms']):.1f}) | {t['serial_floor_ms']:.1f} | "
                      f"{t['overlapped_floor_ms']:.1f} | {t['ratio']:.2f} | "
                      f"{t['shared_cores_floor_ms']:.1f} ({t['shared_cores_ratio']:.2f}) | "
                      f"{'yes' if t['first_token_match'] else 'NO'} | "
                      f"{','.join(map(str, t['chunks_per_run'])) or '?'} |")
    print("\nBytes on the wire (IP packets incl. headers, ACKs, retransmissions), per hop:\n")
    print("| model | mode | hop | bytes/token (decode) | reverse bytes/token | " +
          " | ".join(f"prefill {n} bytes" for n in args.prompts) + " |")
    print("|---|---|---|---|---|" + "---|" * len(args.prompts))
    for res in results:
        for r in res["rows"]:
            for link, b in r["bytes_per_token_per_hop"].items():
                print(f"| {res['model']} | {r['mode']} | {link} | {b:.0f} | "
                      f"{r['reverse_bytes_per_token_per_hop'][link]:.0f} | " +
                      " | ".join(f"{r['ttft'][n]['bytes_per_hop'][link]:.0f}" for n in args.prompts) + " |")
    print("\nload average (1/5/15 min) before/after the client's measurements: " +
          "; ".join(f"{r['model']} {r['loadavg_before']} / {r['loadavg_after']}" for r in results))


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def git_state() -> dict:
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True)
    return {"commit": head.stdout.strip(), "dirty": bool(dirty.stdout.strip())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="tiny,smollm2", help="comma-separated: tiny, smollm2 or a model dir")
    parser.add_argument("--delay-ms", type=float, default=20.0, help="one-way delay of every link")
    parser.add_argument("--rate-mbit", type=float, default=100.0, help="rate of every link, each direction")
    parser.add_argument("--loss", type=float, default=0.001, help="packet loss probability per direction")
    parser.add_argument("--new-tokens", type=int, default=32, help="timed decode steps per run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prompts", default="128,1024", help="TTFT prompt lengths")
    parser.add_argument("--modes", default="push,relay")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--spot-check", type=float, default=None,
                        help="the client's spot-check rate (default: the client default, 0.1; 0: off, no taps)")
    parser.add_argument("--backend", choices=["auto", "tun", "netem"], default="auto")
    parser.add_argument("--sysctl", action="append", default=[], metavar="KEY=VALUE",
                        help="set in every host namespace, e.g. net.ipv4.tcp_slow_start_after_idle=0")
    parser.add_argument("--route", default="", metavar="OPTIONS",
                        help="options for every host's route, e.g. 'initcwnd 64 initrwnd 64'")
    parser.add_argument("--low-latency", action="store_true",
                        help="hold a 0 us CPU wake-up bound (PM QoS) here and in every peer (peer/low_latency.py)")
    parser.add_argument("--out", default=str(ROOT / "bench_results" / "wan.json"))
    args = parser.parse_args()
    args.prompts = [int(n) for n in args.prompts.split(",")]
    args.modes = args.modes.split(",")
    need_root()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwinds the bed's with-block: all cleaned
    workroot = Path(tempfile.mkdtemp(prefix="molink-bench-wan-"))
    git, results = git_state(), []
    setting = contextlib.ExitStack()
    try:
        cpu_setting = setting.enter_context(low_latency_for_benchmark(args.low_latency))
        log(f"CPU latency setting: {cpu_setting}")
        for name in args.models.split(","):
            results.append(bench_model(name, model_dir(name, workroot), args, workroot))
    except KeyboardInterrupt:
        log("interrupted: the bed and every process in it are gone")
        sys.exit(130)
    finally:
        setting.close()
        shutil.rmtree(workroot, ignore_errors=True)
    print_tables(results, args)
    print(f"CPU latency setting (the same for the floors' measurements and the swarm): {cpu_setting}")
    meta = {"delay_ms": args.delay_ms, "rate_mbit": args.rate_mbit, "loss": args.loss, "new_tokens": args.new_tokens,
            "repeats": args.repeats, "prompts": args.prompts, "threads": args.threads, "sysctls": args.sysctl, "route": args.route,
            "spot_check": args.spot_check, **cpu_setting,
            "cpu_count": os.cpu_count(),
            "python": platform.python_version(), "git": git, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "goals": {"decode_ratio": DECODE_GOAL, "ttft_ratio_vs_overlapped": TTFT_GOAL}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
