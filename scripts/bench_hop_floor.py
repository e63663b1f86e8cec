"""The floor of a hop on this machine: what passing a token's message around a ring of processes
costs with no model, no checks and no encryption at all.

    python scripts/bench_hop_floor.py [--processes 4] [--bytes 300] [--rounds 2000] [--model tiny]
                                      [--out bench_results/hop_floor.json]

A decode step of a 3-peer swarm visits 4 processes in turn (client -> peer0 -> peer1 -> peer2 ->
client). Here N processes (default 4: the same count) sit in a ring on 127.0.0.1, each with a trio
event loop like the peers', reading a message of --bytes (a small model's hidden state plus its
framing) from its predecessor and writing it to its successor; process 0 times each round trip.
Per hop = round trip / N. Two rings are timed, in alternating rounds: plain TCP sockets with trio
(the least a Python peer can do), and the same with a blocking socket loop and no event loop (the
least any Python process can do). Whatever a swarm adds per hop on top of this (the protocol,
checks, scheduling, AEAD) is its own overhead; this part is the machine's: waking a process whose
vCPU may be halted, the loopback TCP path and the interpreter.

Two more rings ("trio + spans", "blocking + spans", with --model: tiny, or a model dir) are the
least a pipelined model can do here: each relay runs its span of the model on the message, a
decode step with its own KV cache (SpanModel.step, the peers' code), and passes the output on. Its round trip is then the
floor of a token's latency through a swarm of that many processes on this machine: every hop's
bare cost plus each span's compute in a process that waited idle for its turn.

The table also says what is left of a per-token goal once the in-process compute is paid, e.g.
`--goal-ms 2.5 --compute-ms 1.9` (issue #3: tiny model, 3 peers, 2.5 ms/token; its spans in one
process take 1.9 ms/token, bench_latency.py).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import sys
import tempfile
import time
from multiprocessing import get_context
from pathlib import Path


def _relay_trio(listen_port: int, next_port: int, size: int, ready, span_args=None) -> None:
    import trio

    work = _span_work(*span_args) if span_args else None

    async def main():
        listener = (await trio.open_tcp_listeners(listen_port, host="127.0.0.1"))[0]
        ready.set()
        upstream = await listener.accept()
        downstream = await _connect_trio(next_port)
        while True:
            data = await _receive_exactly(upstream, size)
            if not data:
                return
            await downstream.send_all(work(data) if work is not None else data)
            if work is not None:
                work.between_rounds()

    trio.run(main)


class _SpanWork:
    """bytes of a [1, 1, hidden] float32 state -> the span's output for it: one decode step of a
    session of its own, which starts over (a 16-token prompt, between rounds) every SESSION_STEPS
    steps, as bench_latency's generations do: the KV cache stays as short as theirs."""

    SESSION_STEPS = 64

    def __init__(self, model_dir: str, start: int, end: int):
        import torch

        from molink.peer.span import SpanModel

        torch.set_num_threads(1)
        self.torch, self.start, self.end = torch, start, end
        self.span = SpanModel.load(model_dir, start, end, progress=False)
        self.hidden = self.span.config.hidden_size
        self.mask = torch.ones(1, 1, dtype=torch.long)
        self.steps = self.SESSION_STEPS

    def __call__(self, data: bytes) -> bytes:
        x = self.torch.frombuffer(bytearray(data), dtype=self.torch.float32).view(1, 1, self.hidden)
        self.steps += 1
        return self.span.step(self.session, x, self.mask).contiguous().numpy().tobytes()

    def between_rounds(self) -> None:
        if self.steps >= self.SESSION_STEPS:
            self.session = self.span.new_session(self.start, self.end)
            prompt = self.torch.randn(1, 16, self.hidden)
            self.span.step(self.session, prompt, self.torch.ones(1, 16, dtype=self.torch.long))
            self.steps = 0


def _span_work(model_dir: str, start: int, end: int) -> _SpanWork:
    work = _SpanWork(model_dir, start, end)
    work.between_rounds()
    return work


async def _connect_trio(port: int):
    import trio

    for _ in range(200):
        try:
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, True)
            return stream
        except OSError:
            await trio.sleep(0.01)
    raise RuntimeError(f"nobody listens on {port}")


async def _receive_exactly(stream, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = await stream.receive_some(size - len(data))
        if not chunk:
            return b""
        data += chunk
    return data


def _relay_blocking(listen_port: int, next_port: int, size: int, ready, span_args=None) -> None:
    work = _span_work(*span_args) if span_args else None
    server = socket.create_server(("127.0.0.1", listen_port))
    ready.set()
    upstream, _ = server.accept()
    downstream = _connect_blocking(next_port)
    while True:
        data = _recv_exactly(upstream, size)
        if not data:
            return
        downstream.sendall(work(data) if work is not None else data)
        if work is not None:
            work.between_rounds()


def _connect_blocking(port: int) -> socket.socket:
    for _ in range(200):
        try:
            sock = socket.create_connection(("127.0.0.1", port))
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, True)
            return sock
        except OSError:
            time.sleep(0.01)
    raise RuntimeError(f"nobody listens on {port}")


def _recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            return b""
        data += chunk
    return bytes(data)


def _free_ports(n: int) -> list[int]:
    socks = [socket.create_server(("127.0.0.1", 0)) for _ in range(n)]
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


class Ring:
    """Processes 1..N-1 relay; this process is process 0 (sends, then waits for the message back)."""

    def __init__(self, processes: int, size: int, kind: str, spans: list[tuple[str, int, int]] | None = None):
        ctx = get_context("spawn")
        self.size, ports = size, _free_ports(processes)
        relay = _relay_blocking if kind.startswith("blocking") else _relay_trio
        self.children = []
        for i in range(1, processes):
            ready = ctx.Event()
            extra = (spans[i - 1],) if spans else ()
            child = ctx.Process(target=relay, args=(ports[i], ports[(i + 1) % processes], size, ready, *extra),
                                daemon=True)
            child.start()
            ready.wait(120)
            self.children.append(child)
        server = socket.create_server(("127.0.0.1", ports[0]))
        self.out = _connect_blocking(ports[1])
        self.back, _ = server.accept()
        server.close()
        self.payload = os.urandom(size) if not spans else b"\0" * size  # a float32 state when spans run it

    def round_trip(self) -> float:
        started = time.perf_counter()
        self.out.sendall(self.payload)
        _recv_exactly(self.back, self.size)
        return time.perf_counter() - started

    def close(self) -> None:
        self.out.close()
        self.back.close()
        for child in self.children:
            child.join(5)
            if child.is_alive():
                child.kill()


def spans_ring(args, kind: str, directory: Path) -> Ring:
    """The ring whose relays run the model's spans, split evenly (what a swarm of that many peers does)."""
    from molink.peer.checkpoint import load_config
    from molink.swarm.model import even_boundaries

    config = load_config(directory)
    spans = [(str(directory), start, end) for start, end in even_boundaries(config.num_hidden_layers, args.processes - 1)]
    print(f"[hop-floor] {kind} ring: spans {[(a, b) for _, a, b in spans]} of {directory}", file=sys.stderr, flush=True)
    return Ring(args.processes, 4 * config.hidden_size, kind, spans)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", type=int, default=4)
    parser.add_argument("--bytes", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=2000)
    parser.add_argument("--pause-ms", type=float, default=0.0, help="idle time between rounds (0: back to back, "
                                                                    "as bench_latency's decode steps)")
    parser.add_argument("--goal-ms", type=float, default=2.5)
    parser.add_argument("--compute-ms", type=float, default=1.9)
    parser.add_argument("--model", default="", help="tiny, or a model dir: adds the ring whose relays run "
                                                      "the model's spans (processes - 1 of them)")
    parser.add_argument("--out", default="bench_results/hop_floor.json")
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from make_tiny_model import bench_model_dir

    workdir = Path(tempfile.mkdtemp(prefix="molink-hop-floor-"))
    rings = {kind: Ring(args.processes, args.bytes, kind) for kind in ("trio", "blocking")}
    try:
        if args.model:
            directory = bench_model_dir(args.model, workdir, positions=4096) if args.model == "tiny" \
                else Path(args.model)
            for kind in ("trio + spans", "blocking + spans"):
                rings[kind] = spans_ring(args, kind, directory)
    except BaseException:
        for ring in rings.values():
            ring.close()
        raise
    times: dict[str, list[float]] = {kind: [] for kind in rings}
    try:
        for ring in rings.values():
            for _ in range(50):
                ring.round_trip()  # warm-up
        for index in range(args.rounds):
            for kind, ring in rings.items():
                times[kind].append(ring.round_trip())
                time.sleep(args.pause_ms / 1000)
            if (index + 1) % max(1, args.rounds // 4) == 0:
                print(f"[hop-floor] {index + 1}/{args.rounds} rounds", file=sys.stderr, flush=True)
    finally:
        for ring in rings.values():
            ring.close()
        shutil.rmtree(workdir, ignore_errors=True)
    budget = (args.goal_ms - args.compute_ms) / args.processes
    rows = []
    for kind, samples in times.items():
        per_hop = sorted(1000 * t / args.processes for t in samples)
        rows.append({"ring": kind, "round_trip_median_ms": args.processes * statistics.median(per_hop),
                     "hop_median_ms": statistics.median(per_hop), "hop_p10_ms": per_hop[len(per_hop) // 10],
                     "hop_p90_ms": per_hop[9 * len(per_hop) // 10]})
    print(f"\nOne hop = a {args.bytes}-byte message passed to the next of {args.processes} processes on 127.0.0.1 "
          f"(TCP_NODELAY), {args.rounds} rounds, {args.pause_ms} ms idle between rounds; {os.cpu_count()} cores\n")
    print("| ring | round trip ms, median | per hop ms, median | p10 | p90 |")
    print("|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['ring']} | {row['round_trip_median_ms']:.3f} | {row['hop_median_ms']:.3f} | "
              f"{row['hop_p10_ms']:.3f} | {row['hop_p90_ms']:.3f} |")
    print(f"\nA goal of {args.goal_ms} ms/token with {args.compute_ms} ms of compute leaves {budget:.3f} ms per hop "
          f"for {args.processes} hops.")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "cores": os.cpu_count(), "budget_per_hop_ms": budget,
                               "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
