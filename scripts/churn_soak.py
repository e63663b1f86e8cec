"""Churn soak: clients generate non-stop while peers join, leave, die and freeze on a seeded schedule.

    python scripts/churn_soak.py [--minutes 10] [--peers 8] [--clients 2] [--seed 0] [--model DIR]
                                 [--out bench_results/churn_soak.json]

A LocalSwarm of --peers real peer processes (tiny 6-layer llama from make_tiny_model, or --model)
starts with every block served ~3 times (thirds and halves of the model). Then, every
--event-every seconds (uniform in A:B), the scheduler either
  - removes a ready peer: SIGTERM (graceful leave), SIGKILL, or SIGSTOP followed by SIGKILL
    5-15 s later; a replacement usually joins 1-5 s later, with an explicit span (the victim's)
    or with automatic span choice (blocks=None, --num-blocks 2|3); never below --min-alive, or
  - adds a peer, while fewer than --peers are alive.
If a coverage hole stays open longer than --rescue-after seconds, a "rescue" peer is started on it
(counted in the report: it means the swarm did not heal by itself).

Meanwhile --clients threads, each with its own DistributedModelForCausalLM, generate greedily
(random seeded prompts, batch 1 or 2 with left padding, 16-32 new tokens); every output is compared
token by token with transformers' generate on the same weights. A monitor thread (its own client)
polls find_spans() and computes coverage_gaps over the records of peers that are alive and not
frozen (a SIGKILLed peer's record stays in the DHT until it expires); "heal time" of a removal is
the time until the first poll without a gap (0 when the first poll after it saw none).
At the end, the open fds (/proc/PID/fd) and threads (/proc/PID/status) of every surviving peer are
compared with the values taken when it became ready. Progress goes to stderr, a markdown table to
stdout, everything to JSON. Every process started here is stopped, on Ctrl-C too; the swarm's
workdir (peer logs) is kept and printed.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import re
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

STARTED = time.monotonic()


def log(message: str) -> None:
    print(f"[churn {time.monotonic() - STARTED:7.1f}s] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------- peers we track


def proc_counts(pid: int) -> tuple[int | None, int | None]:
    """(open fds, threads) of a live process, None where /proc does not say."""
    try:
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        fds = None
    threads = None
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("Threads:"):
                threads = int(line.split()[1])
    except OSError:
        pass
    return fds, threads


@dataclass
class Tracked:
    peer: object  # molink.swarm.local_swarm.PeerProcess
    kind: str  # initial | explicit | auto | rescue
    spawned_at: float
    state: str = "starting"  # starting | ready | leaving | frozen | dead
    ready_at: float | None = None
    peer_id: str | None = None
    span: tuple[int, int] | None = None  # the latest known (explicit, or seen in the DHT)
    removal: str | None = None  # term | kill | freeze
    removed_at: float | None = None
    base: tuple[int | None, int | None] = (None, None)
    end: tuple[int | None, int | None] = (None, None)
    exit_code: int | None = None
    exit_seconds: float | None = None  # SIGTERM -> exit
    unexpected_exit: bool = False

    @property
    def name(self) -> str:
        return self.peer.name


class Registry:
    def __init__(self):
        self.lock = threading.Lock()
        self.peers: list[Tracked] = []

    def live_ids(self) -> set[str]:
        with self.lock:
            return {t.peer_id for t in self.peers if t.state == "ready" and t.peer_id}

    def by_id(self, peer_id: str) -> Tracked | None:
        with self.lock:
            return next((t for t in self.peers if t.peer_id == peer_id), None)

    def count(self, *states: str) -> int:
        with self.lock:
            return sum(1 for t in self.peers if t.state in states)


# ---------------------------------------------------------------------------- clients


class Reference:
    """transformers' generate on the same weights (one model, shared by the client threads)."""

    def __init__(self, model_dir: Path):
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).train(False)
        self.lock = threading.Lock()

    def generate(self, ids: torch.Tensor, mask: torch.Tensor, new_tokens: int) -> torch.Tensor:
        with self.lock, torch.inference_mode():
            return self.model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False)


def random_prompt(rng: random.Random, vocab: int, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch 1 or 2, rows of 4-24 random tokens, left-padded."""
    lengths = [rng.randint(4, 24) for _ in range(rng.choice((1, 2)))]
    width = max(lengths)
    ids = torch.full((len(lengths), width), pad, dtype=torch.long)
    mask = torch.zeros((len(lengths), width), dtype=torch.long)
    for row, length in enumerate(lengths):
        ids[row, width - length:] = torch.tensor([rng.randrange(3, vocab) for _ in range(length)])
        mask[row, width - length:] = 1
    return ids, mask


def cached_not_live(model, registry: "Registry") -> tuple[float, list[str]]:
    """(age in s of the client's cached span records, cached peers that left/died more than 12 s ago)."""
    age = time.monotonic() - getattr(model, "_records_at", float("nan"))
    now = time.monotonic()
    stale = []
    for record in list(getattr(model, "_records", [])):
        tracked = registry.by_id(record.peer_id)
        if tracked is not None and tracked.removed_at is not None and now - tracked.removed_at > 12:
            stale.append(tracked.name)
    return age, stale


def client_loop(index: int, model, reference: Reference, seed: int, stop: threading.Event,
                results: list, vocab: int, pad: int, registry: "Registry") -> None:
    rng = random.Random(seed * 1000 + index)
    number = 0
    while not stop.is_set():
        ids, mask = random_prompt(rng, vocab, pad)
        new_tokens = rng.randint(16, 32)
        started = time.monotonic()
        error, out = None, None
        try:
            out = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False)
        except Exception as exc:  # counted, reported; the client goes on
            error = f"{type(exc).__name__}: {exc}"
        except BaseException:  # trio.Cancelled leaks out of generate() when the model is closed under it
            if stop.is_set():
                return
            raise
        seconds = time.monotonic() - started
        if error and getattr(model, "_loop", True) is None:
            return  # closed under us (Ctrl-C): not the swarm's failure
        try:
            recoveries = [{k: v for k, v in r.items()} for r in model.last_recoveries]
        except Exception:
            recoveries = []
        records_age, stale_cached = cached_not_live(model, registry)
        expected = reference.generate(ids, mask, new_tokens)
        checked = mismatched = 0
        if out is not None:
            new_expected = expected[:, ids.shape[1]:]
            new_got = out[:, ids.shape[1]:]
            checked = new_expected.numel()
            if new_got.shape != new_expected.shape:
                mismatched = max(new_got.numel(), new_expected.numel())
            else:
                mismatched = int((new_got != new_expected).sum())
        row = {"client": index, "number": number, "at": started - STARTED, "seconds": seconds,
               "batch": ids.shape[0], "prompt": ids.shape[1], "new_tokens": new_tokens,
               "tokens_checked": checked, "mismatches": mismatched, "error": error,
               "recoveries": recoveries, "records_age": records_age, "stale_cached": stale_cached, "route": [(h.peer_id, h.start, h.end) for h in model.last_route]}
        results.append(row)
        number += 1
        if error:
            log(f"client {index}: generation {number} FAILED after {seconds:.1f} s: {error}")
            stop.wait(1.0)
        elif mismatched:
            log(f"client {index}: generation {number} MISMATCH: {mismatched}/{checked} tokens differ")
        elif recoveries:
            log(f"client {index}: generation {number} ok after {len(recoveries)} recovery(ies): "
                + ", ".join(f"{r['seconds']:.1f}s ({r['error'][:60]})" for r in recoveries))


class Monitor:
    """Polls the DHT with its own client: which blocks have no live, unfrozen peer."""

    def __init__(self, model, registry: Registry, num_blocks: int, poll: float):
        self.model, self.registry, self.num_blocks, self.poll = model, registry, num_blocks, poll
        self.samples: list[dict] = []
        self.lock = threading.Lock()
        self.errors = 0

    def run(self, stop: threading.Event) -> None:
        from molink.swarm.routing import coverage_gaps

        while not stop.is_set():
            started = time.monotonic()
            try:
                records = self.model.find_spans()
            except Exception as exc:
                self.errors += 1
                log(f"monitor: find_spans failed: {type(exc).__name__}: {exc}")
                stop.wait(self.poll)
                continue
            ended = time.monotonic()
            live = self.registry.live_ids()
            live_records = [r for r in records if r.peer_id in live]
            for r in records:
                tracked = self.registry.by_id(r.peer_id)
                if tracked is not None and tracked.state == "ready":
                    tracked.span = (r.start, r.end)
            sample = {"start": started, "end": ended, "gaps": coverage_gaps(live_records, self.num_blocks),
                      "dht_gaps": coverage_gaps(records, self.num_blocks),
                      "ids": sorted(r.peer_id for r in records), "live_missing": sorted(live - {r.peer_id for r in records})}
            with self.lock:
                self.samples.append(sample)
            stop.wait(max(0.0, self.poll - (ended - started)))

    def latest(self) -> dict | None:
        with self.lock:
            return self.samples[-1] if self.samples else None

    def snapshot(self) -> list[dict]:
        with self.lock:
            return list(self.samples)


# ---------------------------------------------------------------------------- the schedule


def initial_spans(num_blocks: int, count: int) -> list[tuple[int, int]]:
    """Thirds, halves, thirds, ... : every block served ~count/2.5 times."""
    from molink.swarm.model import even_boundaries

    layouts = [even_boundaries(num_blocks, 3), even_boundaries(num_blocks, 2)]
    spans: list[tuple[int, int]] = []
    i = 0
    while len(spans) < count:
        spans.extend(layouts[i % 2])
        i += 1
    return spans[:count]


class Churn:
    def __init__(self, swarm, registry: Registry, monitor: Monitor, rng: random.Random, args, num_blocks: int):
        self.swarm, self.registry, self.monitor, self.rng, self.args = swarm, registry, monitor, rng, args
        self.num_blocks = num_blocks
        self.timers: list[tuple[float, str, object]] = []  # (when, what, callable)
        self.events: list[dict] = []  # removals, joins, rescues (for the report)
        self.hole_since: float | None = None

    # -- actions

    def spawn(self, blocks: tuple[int, int] | None, kind: str) -> Tracked:
        extra = []
        if blocks is None:
            extra = ["--num-blocks", str(self.rng.choice((2, 3))), "--rebalance-interval",
                     str(self.args.rebalance_interval)]
        peer = self.swarm.add_peer(blocks, wait=False, extra_args=extra)
        tracked = Tracked(peer, kind, time.monotonic(), span=blocks)
        with self.registry.lock:
            self.registry.peers.append(tracked)
        what = f"blocks {blocks[0]}:{blocks[1]}" if blocks else f"auto span ({' '.join(extra)})"
        log(f"join: {peer.name} ({kind}, {what})")
        self.events.append({"type": "join", "at": tracked.spawned_at - STARTED, "peer": peer.name, "kind": kind,
                            "blocks": blocks})
        return tracked

    def remove(self, victim: Tracked, how: str) -> None:
        now = time.monotonic()
        victim.removal, victim.removed_at = how, now
        latest = self.monitor.latest()
        if how == "term":
            victim.state = "leaving"
            victim.peer.process.send_signal(signal.SIGTERM)  # exit is polled: it withdraws, then exits 0
        elif how == "kill":
            victim.state = "dead"
            self.swarm.kill(victim.peer, signal.SIGKILL)
        else:
            victim.state = "frozen"
            self.swarm.kill(victim.peer, signal.SIGSTOP)
            delay = self.rng.uniform(5, 15)
            self.timers.append((now + delay, f"SIGKILL frozen {victim.name}", lambda v=victim: self._kill_frozen(v)))
        event = {"type": "remove", "how": how, "at": now - STARTED, "t": now, "peer": victim.name,
                 "peer_id": victim.peer_id, "span": victim.span, "kind": victim.kind}
        self.events.append(event)
        log(f"remove: {how} {victim.name} (span {victim.span}, {victim.kind}); "
            f"{self.registry.count('ready')} ready, {self.registry.count('starting')} starting")
        if latest is not None:
            event["gaps_before"] = latest["gaps"]
        replace = self.registry.count("ready", "starting") < self.args.peers and self.rng.random() < 0.85
        if self.registry.count("ready", "starting") <= self.args.min_alive:
            replace = True
        if replace:
            auto = self.rng.random() < self.args.auto_fraction or victim.span is None
            blocks = None if auto else victim.span
            delay = self.rng.uniform(1, 5)
            self.timers.append((now + delay, "replacement", lambda b=blocks: self.spawn(b, "auto" if b is None else "explicit")))

    def finish_timers(self) -> None:
        """At the end: frozen peers get their SIGKILL now; replacements not started yet are dropped."""
        for _, what, action in self.timers:
            if what.startswith("SIGKILL"):
                action()
        self.timers = []

    def _kill_frozen(self, victim: Tracked) -> None:
        self.swarm.kill(victim.peer, signal.SIGKILL)
        victim.state = "dead"
        log(f"SIGKILL frozen {victim.name}")

    # -- the loop

    def poll_peers(self) -> None:
        now = time.monotonic()
        with self.registry.lock:
            tracked = list(self.registry.peers)
        for t in tracked:
            code = t.peer.process.poll()
            if t.state == "starting":
                if t.peer.ready_file.exists():
                    t.peer.address = t.peer.ready_file.read_text().strip()
                    t.peer_id = t.peer.address.rsplit("/p2p/", 1)[1]
                    t.ready_at = now
                    t.base = proc_counts(t.peer.pid)
                    t.state = "ready"
                    log(f"ready: {t.peer.name} after {now - t.spawned_at:.1f} s (fds {t.base[0]}, threads {t.base[1]})")
                elif code is not None:
                    t.state, t.exit_code, t.unexpected_exit = "dead", code, True
                    log(f"!! {t.peer.name} exited with {code} before ready:\n{t.peer.log_tail(15)}")
            elif t.state == "ready" and code is not None:
                t.state, t.exit_code, t.unexpected_exit = "dead", code, True
                log(f"!! {t.peer.name} died by itself with {code}:\n{t.peer.log_tail(15)}")
            elif t.state == "leaving":
                if code is not None:
                    t.state, t.exit_code, t.exit_seconds = "dead", code, now - t.removed_at
                    log(f"left: {t.peer.name} exited {code} {t.exit_seconds:.1f} s after SIGTERM")
                elif now - t.removed_at > 30:
                    log(f"!! {t.peer.name} still running 30 s after SIGTERM: SIGKILL")
                    self.swarm.kill(t.peer, signal.SIGKILL)
                    t.state, t.exit_code, t.exit_seconds = "dead", t.peer.process.returncode, None
            elif t.state == "dead" and t.exit_code is None and code is not None:
                t.exit_code = code

    def run_timers(self) -> None:
        now = time.monotonic()
        due = [x for x in self.timers if x[0] <= now]
        self.timers = [x for x in self.timers if x[0] > now]
        for _, _what, action in due:
            action()

    def rescue(self) -> None:
        """A hole open for longer than --rescue-after: start an explicit peer on it."""
        latest = self.monitor.latest()
        now = time.monotonic()
        if latest is None or not latest["gaps"]:
            self.hole_since = None
            return
        self.hole_since = self.hole_since or latest["start"]
        if now - self.hole_since < self.args.rescue_after:
            return
        with self.registry.lock:
            rescuing = any(t.kind == "rescue" and t.state == "starting" for t in self.registry.peers)
        if rescuing:
            return
        start, end = latest["gaps"][0]
        if end - start < 2:
            start, end = (start, end + 1) if end < self.num_blocks else (start - 1, end)
        log(f"!! hole {latest['gaps']} open for {now - self.hole_since:.0f} s: rescue peer on {start}:{end}")
        self.events.append({"type": "rescue", "at": now - STARTED, "gaps": latest["gaps"],
                            "open_seconds": now - self.hole_since})
        self.spawn((start, end), "rescue")

    def tick(self, next_event: float) -> float:
        self.poll_peers()
        self.run_timers()
        self.rescue()
        now = time.monotonic()
        if now < next_event:
            return next_event
        lo, hi = self.args.event_every
        alive = self.registry.count("ready", "starting")
        with self.registry.lock:
            ready = [t for t in self.registry.peers if t.state == "ready"]
        if alive < self.args.peers and (alive <= self.args.min_alive or self.rng.random() < 0.5):
            if self.rng.random() < self.args.auto_fraction:
                self.spawn(None, "auto")
            else:
                self.spawn(self.rng.choice(initial_spans(self.num_blocks, 5)), "explicit")
        elif len(ready) - 1 >= self.args.min_alive and ready:
            victim = self.rng.choice(ready)
            how = self.rng.choices(("term", "kill", "freeze"), weights=self.args.weights)[0]
            self.remove(victim, how)
        else:
            log(f"no event: {len(ready)} ready, {alive} alive (min {self.args.min_alive})")
        return now + self.rng.uniform(lo, hi)


def leave_all(registry: Registry, workdir: Path, timeout: float = 25.0, dump_after: float = 10.0) -> dict:
    """SIGTERM every peer still running, at once; how long each took to exit, and with what code.

    A peer still running `dump_after` s later gets its Python stacks dumped (py-spy, when
    installed) to <workdir>/<name>.stacks.txt. LocalSwarm.stop() then SIGKILLs what is left.
    """
    import subprocess

    spy = shutil.which("py-spy") or (str(Path(sys.executable).parent / "py-spy")
                                     if (Path(sys.executable).parent / "py-spy").exists() else None)
    alive = [t for t in registry.peers if t.peer.process.poll() is None]
    started = time.monotonic()
    for t in alive:
        try:
            t.peer.process.send_signal(signal.SIGCONT)
            t.peer.process.send_signal(signal.SIGTERM)
        except ProcessLookupError:
            pass
    exited: dict[str, float] = {}
    dumped: dict[str, str] = {}
    while time.monotonic() - started < timeout:
        now = time.monotonic()
        for t in alive:
            if t.name in exited:
                continue
            if t.peer.process.poll() is not None:
                exited[t.name] = now - started
            elif now - started > dump_after and t.name not in dumped and spy:
                path = workdir / f"{t.name}.stacks.txt"
                try:
                    dump = subprocess.run([spy, "dump", "--native", "--pid", str(t.peer.pid)],
                                          capture_output=True, text=True, timeout=20)
                    path.write_text(dump.stdout + dump.stderr)
                except (OSError, subprocess.SubprocessError) as exc:
                    path.write_text(f"py-spy failed: {exc}")
                dumped[t.name] = str(path)
                log(f"!! {t.name} still running {now - started:.0f} s after SIGTERM; stacks in {path}")
        if len(exited) == len(alive):
            break
        time.sleep(0.1)
    return {"peers": len(alive), "ready": [t.name for t in alive if t.state == "ready"], "exit_seconds": exited,
            "exit_codes": {t.name: t.peer.process.poll() for t in alive},
            "not_exited": [t.name for t in alive if t.name not in exited], "stacks": dumped}


# ---------------------------------------------------------------------------- the report


def heal_times(events: list[dict], samples: list[dict], finished: float) -> list[dict]:
    """Per removal: seconds from the removal to the first monitor poll (started after it) without a gap."""
    out = []
    for event in (e for e in events if e["type"] == "remove"):
        t0 = event["t"]
        after = [s for s in samples if s["start"] >= t0]
        healed, seen_hole = None, False
        for s in after:
            if not s["gaps"]:
                healed = 0.0 if not seen_hole else s["end"] - t0
                break
            seen_hole = True
        hole = next((s["gaps"] for s in after if s["gaps"]), None) if seen_hole else None
        out.append({"peer": event["peer"], "how": event["how"], "at": event["at"], "hole": hole,
                    "heal_seconds": healed, "unhealed_for": None if healed is not None else finished - t0})
    return out


def stale_record_seconds(events: list[dict], samples: list[dict]) -> list[float]:
    """For each SIGKILLed/frozen peer: how long its record was still listed by find_spans after it."""
    out = []
    for event in (e for e in events if e["type"] == "remove" and e["how"] in ("kill", "freeze") and e["peer_id"]):
        seen = [s["end"] for s in samples if s["start"] >= event["t"] and event["peer_id"] in s["ids"]]
        out.append(max(seen) - event["t"] if seen else 0.0)
    return out


def scan_logs(workdir: Path) -> dict[str, dict]:
    counts = {}
    for path in sorted(workdir.glob("*.log")):
        text = path.read_text(errors="replace")
        counts[path.stem] = {"traceback": text.count("Traceback"), "error": len(re.findall(r" ERROR ", text)),
                             "warning": len(re.findall(r" WARNING ", text))}
    return counts


def summarize(results: list[dict], heals: list[dict], registry: Registry, stale: list[float],
              events: list[dict], monitor: Monitor, minutes_run: float) -> dict:
    recoveries = [r["seconds"] for g in results for r in g["recoveries"]]
    healed = [h["heal_seconds"] for h in heals if h["heal_seconds"] is not None]
    unhealed = [h for h in heals if h["heal_seconds"] is None]
    survivors = [t for t in registry.peers if t.state == "ready" and t.base[0] is not None and t.end[0] is not None]
    fd_growth = {t.name: t.end[0] - t.base[0] for t in survivors}
    thread_growth = {t.name: t.end[1] - t.base[1] for t in survivors if t.end[1] is not None and t.base[1] is not None}
    ready_times = [t.ready_at - t.spawned_at for t in registry.peers if t.ready_at]
    removals = [e for e in events if e["type"] == "remove"]
    return {
        "minutes": minutes_run,
        "generations": len(results),
        "failed": sum(1 for g in results if g["error"]),
        "mismatched_generations": sum(1 for g in results if g["mismatches"]),
        "token_mismatches": sum(g["mismatches"] for g in results),
        "tokens_checked": sum(g["tokens_checked"] for g in results),
        "recoveries": len(recoveries),
        "recovery_worst_s": max(recoveries, default=None),
        "recovery_median_s": statistics.median(recoveries) if recoveries else None,
        "generation_worst_s": max((g["seconds"] for g in results), default=None),
        "removals": {how: sum(1 for e in removals if e["how"] == how) for how in ("term", "kill", "freeze")},
        "joins": sum(1 for e in events if e["type"] == "join" and e["kind"] != "initial"),
        "rescues": sum(1 for e in events if e["type"] == "rescue"),
        "holes_opened": sum(1 for h in heals if h["hole"]),
        "heal_worst_s": max(healed, default=None) if not unhealed else None,
        "heal_unhealed": len(unhealed),
        "stale_record_worst_s": max(stale, default=None),
        "peer_ready_median_s": statistics.median(ready_times) if ready_times else None,
        "peer_ready_worst_s": max(ready_times, default=None),
        "term_exit_codes": [t.exit_code for t in registry.peers if t.removal == "term"],
        "unexpected_exits": [t.name for t in registry.peers if t.unexpected_exit],
        "survivors": len(survivors),
        "fd_growth_max": max(fd_growth.values(), default=None),
        "thread_growth_max": max(thread_growth.values(), default=None),
        "fd_growth": fd_growth,
        "thread_growth": thread_growth,
        "client_records_age_worst_s": max((g["records_age"] for g in results if g["records_age"] == g["records_age"]),
                                          default=None),
        "generations_with_stale_cache": sum(1 for g in results if g["stale_cached"]),
        "monitor_polls": len(monitor.samples),
        "monitor_errors": monitor.errors,
    }


def fmt(value, unit: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.2f}{unit}"
    return f"{value}{unit}"


def final_leave_row(leave: dict | None) -> str:
    if not leave:
        return "-"
    ready = leave["ready"]
    ok = sum(1 for name in ready if leave["exit_codes"][name] == 0)
    slowest = max((leave["exit_seconds"][name] for name in ready if name in leave["exit_seconds"]), default=None)
    text = f"{ok} / {len(ready)}, {fmt(slowest, ' s')}"
    if leave["not_exited"]:
        text += f"; still running after 25 s: {', '.join(leave['not_exited'])}"
    starting = {name: code for name, code in leave["exit_codes"].items() if name not in ready}
    if starting:
        text += "; not ready yet: " + ", ".join(f"{name} exit {code}" for name, code in starting.items())
    return text


def print_table(s: dict, args) -> None:
    heal = fmt(s["heal_worst_s"], " s") if not s["heal_unhealed"] else f"{s['heal_unhealed']} never healed"
    rows = [
        ("duration", f"{s['minutes']:.1f} min, {args.peers} peers, {args.clients} clients, seed {args.seed}", ""),
        ("churn events", f"{s['removals']['term']} SIGTERM, {s['removals']['kill']} SIGKILL, "
                         f"{s['removals']['freeze']} SIGSTOP+SIGKILL, {s['joins']} joins, {s['rescues']} rescues",
         "0 rescues"),
        ("generations total", fmt(s["generations"]), ""),
        ("generations failed", fmt(s["failed"]), "0"),
        ("token mismatches", f"{s['token_mismatches']} (in {s['mismatched_generations']} generations)", "0"),
        ("tokens checked", fmt(s["tokens_checked"]), ""),
        ("recoveries", fmt(s["recoveries"]), ""),
        ("recovery time worst / median", f"{fmt(s['recovery_worst_s'], ' s')} / {fmt(s['recovery_median_s'], ' s')}", ""),
        ("slowest generation", fmt(s["generation_worst_s"], " s"), ""),
        ("coverage holes opened by removals", fmt(s["holes_opened"]), ""),
        ("hole heal time, worst", heal, "<= 30 s"),
        ("clients' cached span records: oldest / generations whose cache held a peer gone > 12 s",
         f"{fmt(s['client_records_age_worst_s'], ' s')} / {s['generations_with_stale_cache']}", ""),
        ("dead peer's record still listed, worst", fmt(s["stale_record_worst_s"], " s"), ""),
        ("peer start to ready, median / worst",
         f"{fmt(s['peer_ready_median_s'], ' s')} / {fmt(s['peer_ready_worst_s'], ' s')}", ""),
        ("SIGTERM exit codes", ", ".join(str(c) for c in s["term_exit_codes"]) or "-", "all 0"),
        ("ready peers leaving at the end (all SIGTERM at once): exit 0 / total, slowest",
         final_leave_row(s.get("final_leave")), "all, < 15 s"),
        ("unexpected peer exits", ", ".join(s["unexpected_exits"]) or "0", "0"),
        (f"fd growth per surviving peer, max ({s['survivors']} peers)", fmt(s["fd_growth_max"]), "~0"),
        ("thread growth per surviving peer, max", fmt(s["thread_growth_max"]), "~0"),
    ]
    print("\n| metric | value | goal |")
    print("|---|---|---|")
    for name, value, goal in rows:
        print(f"| {name} | {value} | {goal} |")


# ---------------------------------------------------------------------------- main


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--peers", type=int, default=8, help="peers in the swarm (target count)")
    parser.add_argument("--min-alive", type=int, default=None, help="never fewer ready peers (default max(3, peers/2))")
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", default=None, help="model dir (default: a tiny 6-layer llama in a temp dir)")
    parser.add_argument("--event-every", default="10:20", help="seconds between churn events, uniform in A:B")
    parser.add_argument("--weights", default="35,40,25", help="odds of SIGTERM, SIGKILL, SIGSTOP+SIGKILL")
    parser.add_argument("--auto-fraction", type=float, default=0.5, help="share of joins with automatic span choice")
    parser.add_argument("--rebalance-interval", type=float, default=10.0, help="for the auto-span peers")
    parser.add_argument("--recovery-timeout", type=float, default=60.0, help="clients' failover budget (s)")
    parser.add_argument("--rescue-after", type=float, default=45.0, help="start a peer on a hole open this long (s)")
    parser.add_argument("--monitor-poll", type=float, default=1.0)
    parser.add_argument("--out", default=str(ROOT / "bench_results" / "churn_soak.json"))
    args = parser.parse_args()
    args.event_every = tuple(float(x) for x in args.event_every.split(":"))
    args.weights = [float(x) for x in args.weights.split(",")]
    if args.min_alive is None:
        args.min_alive = max(3, args.peers // 2)
    if args.peers < 3 or args.min_alive >= args.peers:
        parser.error("need --peers >= 3 and --min-alive < --peers")
    return args


def raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main() -> int:
    args = parse_args()
    signal.signal(signal.SIGTERM, raise_interrupt)
    torch.set_num_threads(1)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    from molink.peer.checkpoint import load_config
    from molink.swarm import DistributedModelForCausalLM
    from molink.swarm.local_swarm import LocalSwarm

    rng = random.Random(args.seed)
    made_model = None
    if args.model:
        model_dir = Path(args.model)
    else:
        from make_tiny_model import make_tiny_model

        made_model = Path(tempfile.mkdtemp(prefix="molink-churn-model-"))
        model_dir = make_tiny_model("llama", made_model / "tiny", layers=6, shards=2)
    config = load_config(model_dir)
    num_blocks = config.num_hidden_layers
    pad = config.pad_token_id if config.pad_token_id is not None else 0
    workdir = Path(tempfile.mkdtemp(prefix="molink-churn-"))
    # our own client-side logs (failover warnings, ...) go to a file next to the peers' logs
    handler = logging.FileHandler(workdir / "harness.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(threadName)s %(name)s: %(message)s"))
    logging.getLogger().handlers[:] = [handler]
    logging.getLogger().setLevel(logging.INFO)
    log(f"model {model_dir} ({num_blocks} blocks), swarm workdir {workdir}")

    spans = initial_spans(num_blocks, args.peers)
    swarm = LocalSwarm(model_dir, [], workdir=workdir)
    registry = Registry()
    stop_clients, stop_monitor = threading.Event(), threading.Event()
    clients, threads, results = [], [], []
    monitor_model = monitor = monitor_thread = None
    churn = None
    interrupted = False
    leave = None
    own_fds_before = proc_counts(os.getpid())
    began = finished = time.monotonic()
    try:
        log(f"starting bootstrap + {len(spans)} peers: {spans}")
        swarm.start()
        for index, span in enumerate(spans):
            peer = swarm.add_peer(span, name=f"peer{index}", wait=False)
            registry.peers.append(Tracked(peer, "initial", time.monotonic(), span=span))
        deadline = time.monotonic() + 300
        churn = Churn(swarm, registry, None, rng, args, num_blocks)
        while registry.count("starting") and time.monotonic() < deadline:
            churn.poll_peers()
            time.sleep(0.1)
        if registry.count("ready") < len(spans):
            raise RuntimeError("the initial swarm did not start")
        reference = Reference(model_dir)
        monitor_model = DistributedModelForCausalLM.from_pretrained(model_dir, swarm.initial_peers)
        monitor = Monitor(monitor_model, registry, num_blocks, args.monitor_poll)
        monitor_thread = threading.Thread(target=monitor.run, args=(stop_monitor,), name="monitor", daemon=True)
        monitor_thread.start()
        for index in range(args.clients):
            model = DistributedModelForCausalLM.from_pretrained(model_dir, swarm.initial_peers,
                                                                recovery_timeout=args.recovery_timeout)
            clients.append(model)
            thread = threading.Thread(target=client_loop, name=f"client{index}",
                                      args=(index, model, reference, args.seed, stop_clients, results,
                                            config.vocab_size, pad, registry), daemon=True)
            threads.append(thread)
            thread.start()
        churn.monitor = monitor
        began = time.monotonic()
        end_at = began + 60 * args.minutes
        log(f"churn for {args.minutes} min")
        next_event = began + rng.uniform(*args.event_every)
        last_progress = began
        while time.monotonic() < end_at:
            next_event = churn.tick(next_event)
            if time.monotonic() - last_progress > 30:
                last_progress = time.monotonic()
                log(f"progress: {len(results)} generations, {sum(1 for g in results if g['error'])} failed, "
                    f"{sum(g['mismatches'] for g in results)} mismatched tokens; {registry.count('ready')} ready")
            if not any(t.is_alive() for t in threads):
                raise RuntimeError("every client thread ended")
            time.sleep(0.2)
        log("churn over; letting the clients finish their generation")
        stop_clients.set()
        wait_until = time.monotonic() + args.recovery_timeout + 60
        while any(t.is_alive() for t in threads) and time.monotonic() < wait_until:
            churn.tick(float("inf"))
            time.sleep(0.2)
        stuck = [t.name for t in threads if t.is_alive()]
        if stuck:
            log(f"!! clients still inside generate: {stuck}")
        churn.finish_timers()
        churn.poll_peers()
    except KeyboardInterrupt:
        interrupted = True
        log("interrupted: stopping everything")
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not leave processes behind
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        finished = time.monotonic()
        stop_clients.set()
        stop_monitor.set()
        for thread in threads:
            thread.join(5 if interrupted else 30)
        if monitor_thread is not None:
            monitor_thread.join(10)
        for model in [*clients, monitor_model]:
            if model is not None:
                try:
                    model.close()
                except Exception as exc:
                    log(f"closing a client: {exc}")
        own_fds_after = proc_counts(os.getpid())
        if not interrupted:
            time.sleep(3)  # let the peers notice the clients' connections closing
        for t in registry.peers:
            if t.state == "ready":
                t.end = proc_counts(t.peer.pid)
        if not interrupted and registry.peers:
            log("graceful stop: SIGTERM to every peer")
            leave = leave_all(registry, workdir)
        codes = swarm.stop()
        log(f"swarm stopped; exit codes: {codes}")
        if made_model is not None:
            shutil.rmtree(made_model, ignore_errors=True)

    minutes_run = (finished - began) / 60
    events = churn.events if churn else []
    samples = monitor.snapshot() if monitor else []
    heals = heal_times(events, samples, finished)
    stale = stale_record_seconds(events, samples)
    summary = summarize(results, heals, registry, stale, events, monitor or Monitor(None, registry, 0, 1), minutes_run)
    summary["interrupted"] = interrupted
    summary["final_leave"] = leave
    summary["harness_fds_threads_before_after"] = [own_fds_before, own_fds_after]
    summary["peer_logs"] = scan_logs(workdir)
    summary["workdir"] = str(workdir)
    print_table(summary, args)
    for h in heals:
        if h["hole"]:
            log(f"hole after {h['how']} of {h['peer']} at {h['at']:.0f}s: {h['hole']}, healed in "
                f"{fmt(h['heal_seconds'], ' s')}")
    failures = [g for g in results if g["error"] or g["mismatches"]]
    for g in failures[:10]:
        log(f"bad generation: client {g['client']} #{g['number']} at {g['at']:.0f}s: error={g['error']} "
            f"mismatches={g['mismatches']}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    peers = [{"name": t.name, "kind": t.kind, "peer_id": t.peer_id, "span": t.span, "state": t.state,
              "removal": t.removal, "ready_s": (t.ready_at - t.spawned_at) if t.ready_at else None,
              "fds_threads_ready": t.base, "fds_threads_end": t.end, "exit_code": t.exit_code,
              "term_exit_s": t.exit_seconds, "unexpected_exit": t.unexpected_exit} for t in registry.peers]
    for e in events:
        e.pop("t", None)
    out.write_text(json.dumps({"args": {k: v for k, v in vars(args).items()}, "summary": summary, "heals": heals,
                               "events": events, "peers": peers, "generations": results,
                               "monitor": [{**s, "start": s["start"] - STARTED, "end": s["end"] - STARTED}
                                           for s in samples]}, indent=1, default=str))
    print(f"\nwrote {out}; peer logs in {workdir}")
    bad = summary["failed"] or summary["token_mismatches"] or interrupted
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
