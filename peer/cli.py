"""`molink-peer`: run a volunteer node."""

from __future__ import annotations

import argparse
import logging
import os
import sys


def _add_identity(sub) -> None:
    p = sub.add_parser("identity", help="create (on first use) or show this peer's identity key and peer id",
                       description="Create the Ed25519 identity key file (mode 0600) if it does not exist, "
                                   "then print the libp2p peer id it stands for.")
    p.add_argument("--identity", required=True, help="path of the key file")
    p.set_defaults(func=run_identity)


def run_identity(args) -> int:
    from molink.crypto.identity import IdentityFileError, load_or_create_identity

    try:
        identity = load_or_create_identity(args.identity)
    except IdentityFileError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(identity.peer_id.to_base58())
    return 0


def _add_make_swarm_key(sub) -> None:
    p = sub.add_parser("make-swarm-key", help="create a key for a private swarm",
                       description="Write a new random swarm key to FILE (mode 0600; an existing file is never "
                                   "replaced). Give the same file to every member with --swarm-key FILE: peers, "
                                   "bootstrap nodes and clients without it can neither connect nor read records.")
    p.add_argument("file", metavar="FILE", help="where to write the key")
    p.set_defaults(func=run_make_swarm_key)


def run_make_swarm_key(args) -> int:
    from molink.crypto.swarm_key import SwarmKey, SwarmKeyError, write_swarm_key

    key = SwarmKey.generate()
    try:
        write_swarm_key(key, args.file)
    except (SwarmKeyError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"swarm key written to {args.file} (fingerprint {key.fingerprint}); give every member a copy")
    return 0


def add_swarm_key_arg(p) -> None:
    """`--swarm-key FILE`, on every command that talks to a swarm (molink-swarm uses it too)."""
    p.add_argument("--swarm-key", default=None, metavar="FILE",
                   help="private swarm: connect only to nodes holding this key file "
                        "(made by `molink-peer make-swarm-key`; default: a public swarm)")


def swarm_key_of(args):
    from molink.crypto.swarm_key import load_swarm_key

    return load_swarm_key(args.swarm_key) if getattr(args, "swarm_key", None) else None


# names only: torch is imported by the commands that load weights, not by bootstrap or identity
DTYPES = ("auto", "float32", "float16", "bfloat16")


def _blocks(text: str) -> tuple[int, int]:
    try:
        start, end = (int(x) for x in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError("blocks must look like A:B (e.g. 0:10)") from None
    if not 0 <= start < end:
        raise argparse.ArgumentTypeError("blocks A:B need 0 <= A < B")
    return start, end


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _add_common(p) -> None:
    p.add_argument("--listen", action="append", default=None, metavar="MADDR",
                   help="multiaddr to listen on (repeatable; default /ip4/127.0.0.1/tcp/0)")
    p.add_argument("--identity", default=None, metavar="FILE",
                   help="identity key file, created on first use (default: a new identity each run)")
    p.add_argument("--ready-file", default=None, metavar="FILE",
                   help="write the full multiaddr (with /p2p/<id>) here, atomically, once serving")
    add_swarm_key_arg(p)
    from molink.dht.nat import add_nat_arguments

    add_nat_arguments(p)


def _add_bootstrap(sub) -> None:
    p = sub.add_parser("bootstrap", help="run a DHT-only node that peers and clients meet through",
                       description="Run a DHT-only node (serves no blocks): the swarm's meeting point.")
    _add_common(p)
    p.add_argument("--initial-peers", nargs="*", default=[], metavar="MADDR", help="other bootstrap nodes")
    p.set_defaults(func=run_bootstrap)


def _add_join(sub) -> None:
    p = sub.add_parser("join", help="host blocks of a model and serve them to the swarm",
                       description="Load blocks [A, B) of a model (--blocks, or chosen automatically where the "
                                   "swarm is weakest, and moved later if that helps it), announce them in the "
                                   "DHT and serve inference sessions until Ctrl-C / SIGTERM (then withdraw and "
                                   "exit 0).")
    p.add_argument("--model", required=True, help="model directory (safetensors) or hub id")
    p.add_argument("--blocks", type=_blocks, default=None, metavar="A:B",
                   help="the span of blocks to host (default: choose by memory, speed and the swarm's gaps)")
    p.add_argument("--num-blocks", type=_positive_int, default=None, metavar="N",
                   help="without --blocks: host exactly N blocks (default: what memory and speed justify)")
    p.add_argument("--max-memory", type=float, default=None, metavar="MB",
                   help="without --blocks: memory for blocks + KV cache (default: free device memory minus a margin)")
    p.add_argument("--rebalance-interval", type=float, default=None, metavar="S",
                   help="without --blocks: check every ~S seconds whether moving helps the swarm "
                        "(default 60; 0: never move)")
    p.add_argument("--initial-peers", nargs="+", required=True, metavar="MADDR",
                   help="bootstrap multiaddrs (with /p2p/<id>)")
    _add_common(p)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="auto", help="weights dtype (default: checkpoint's)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--cache-tokens", type=int, default=None,
                   help="KV-cache budget in tokens (default: what --max-cache-mb holds)")
    p.add_argument("--max-cache-mb", type=int, default=1024, help="KV-cache memory budget (default 1024 MB)")
    p.add_argument("--session-timeout", type=float, default=300.0, help="close sessions idle this long (s)")
    _add_session_limits(p)
    p.add_argument("--model-name", default=None, help="name in the DHT key (default: the model folder's name)")
    p.add_argument("--no-batching", action="store_true",
                   help="run every session's step on its own (no continuous batching, no decode-first "
                        "scheduling; also MOLINK_BATCHING=0)")
    p.add_argument("--max-batch", type=_positive_int, default=None, metavar="ROWS",
                   help="most sequences in one batched forward (default 64)")
    p.add_argument("--batch-tokens", type=_positive_int, default=None, metavar="N",
                   help="token budget of one prefill chunk, run behind pending decode steps (default 128)")
    p.add_argument("--batch-window-ms", type=float, default=None, metavar="MS",
                   help="wait at most MS for other active sessions' decode steps before a forward "
                        "(default 8; the wait is also capped at half a single-token forward)")
    p.add_argument("--direct-port", type=int, default=0, metavar="PORT",
                   help="TCP port for direct data channels (default: any free port; see README)")
    p.add_argument("--no-direct", action="store_true",
                   help="serve sessions over libp2p streams only (no direct data channel port)")
    p.add_argument("--metrics-port", type=int, default=None, metavar="PORT",
                   help="serve Prometheus metrics at http://<listen IP>:PORT/metrics (0: any free port; "
                        "default: off)")
    p.add_argument("--low-latency", action="store_true",
                   help="keep this machine's CPUs out of deep idle states while serving (Linux PM QoS, needs "
                        "root; faster steps, more power; also MOLINK_LOW_LATENCY=1; see README)")
    p.set_defaults(func=run_join)


def _add_session_limits(p) -> None:
    from molink.peer.session_limits_config import SessionLimits

    d = SessionLimits()
    p.add_argument("--max-sessions", type=_positive_int, default=d.max_sessions, metavar="N",
                   help=f"sessions open at once on this peer (default {d.max_sessions})")
    p.add_argument("--max-sessions-per-client", type=_positive_int, default=d.max_sessions_per_client, metavar="N",
                   help=f"sessions one client peer id may hold here (default {d.max_sessions_per_client})")
    p.add_argument("--max-session-tokens", type=_positive_int, default=None, metavar="N",
                   help="KV-cache tokens (batch x max length) one session may reserve (default: the whole budget)")
    p.add_argument("--max-session-time", type=float, default=d.max_session_seconds, metavar="S",
                   help=f"close sessions this many seconds after they opened (default {d.max_session_seconds:.0f})")


def _session_limits(args):
    from molink.peer.session_limits_config import SessionLimits

    return SessionLimits(max_sessions=args.max_sessions, max_sessions_per_client=args.max_sessions_per_client,
                         max_session_tokens=args.max_session_tokens, max_session_seconds=args.max_session_time)


def _nat(args, default_mode: str):
    from molink.dht.nat import nat_config_from_args

    return nat_config_from_args(args, default_mode)


def _identity(args):
    from molink.crypto.identity import load_or_create_identity

    return load_or_create_identity(args.identity)


def run_bootstrap(args) -> int:
    import trio

    from molink.peer.bootstrap_node import run_bootstrap_node

    trio.run(run_bootstrap_node, _identity(args), args.listen or ["/ip4/127.0.0.1/tcp/0"], args.ready_file,
             args.initial_peers, swarm_key_of(args), _nat(args, "public"))
    return 0


def run_join(args) -> int:
    import torch
    import trio

    from molink.peer.checkpoint import resolve_model_dir
    from molink.peer.server import PeerConfig, PeerServer

    start, end = args.blocks or (None, None)
    if args.blocks and (args.num_blocks or args.max_memory or args.rebalance_interval is not None):
        raise ValueError("--num-blocks, --max-memory and --rebalance-interval apply only without --blocks")
    if (args.max_memory is not None and args.max_memory <= 0) or (args.rebalance_interval or 0) < 0:
        raise ValueError("--max-memory must be positive and --rebalance-interval not negative")
    auto = {} if args.rebalance_interval is None else {"rebalance_interval": args.rebalance_interval}
    config = PeerConfig(
        model_dir=resolve_model_dir(args.model), start=start, end=end, identity=_identity(args),
        initial_peers=args.initial_peers, listen=args.listen or ["/ip4/127.0.0.1/tcp/0"],
        dtype=None if args.dtype == "auto" else getattr(torch, args.dtype), device=args.device,
        cache_tokens=args.cache_tokens,
        max_cache_bytes=args.max_cache_mb << 20, idle_timeout=args.session_timeout,
        ready_file=args.ready_file, model_name=args.model_name, num_blocks=args.num_blocks,
        max_memory_bytes=int(args.max_memory * 2**20) if args.max_memory else None,
        batching=_batching(args),
        direct_port=None if args.no_direct else args.direct_port, metrics_port=args.metrics_port,
        swarm_key=swarm_key_of(args), session_limits=_session_limits(args), nat=_nat(args, "auto"), **auto)
    from molink.peer.faults import FAULTS_ENV, Faults

    Faults.parse(os.environ.get(FAULTS_ENV, ""))  # a typo in a test's fault spec fails here, not mid-serve
    server = PeerServer.load(config)
    with _low_latency(args):
        trio.run(server.serve)
    return 0


def _low_latency(args):
    from contextlib import nullcontext

    from molink.peer.low_latency import cpu_latency_bound, low_latency_from_env

    return cpu_latency_bound(0) if args.low_latency or low_latency_from_env() else nullcontext()


def _batching(args):
    from molink.peer.scheduler import BatchingConfig

    window = None if args.batch_window_ms is None else args.batch_window_ms / 1000
    return BatchingConfig.from_env(enabled=False if args.no_batching else None, window=window,
                                   max_rows=args.max_batch, max_tokens=args.batch_tokens)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="molink-peer", description="Run a MoLink volunteer peer.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_bootstrap(sub)
    _add_join(sub)
    _add_identity(sub)
    _add_make_swarm_key(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        code = args.func(args)
    except KeyboardInterrupt:
        code = 0
    except Exception as exc:  # a volunteer needs the reason, not a traceback
        from molink.crypto.identity import IdentityFileError
        from molink.crypto.swarm_key import SwarmKeyError
        from molink.peer.checkpoint import CheckpointError
        from molink.peer.families import UnsupportedArchitecture

        if isinstance(exc, (IdentityFileError, SwarmKeyError, CheckpointError, UnsupportedArchitecture, ValueError)):
            print(f"error: {exc}", file=sys.stderr)
            return 2
        raise
    if args.command in ("join", "bootstrap"):
        # The interpreter's final garbage collection over torch's objects takes seconds after the
        # peer has already withdrawn and closed everything: skip it, flush the logs, exit now.
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
