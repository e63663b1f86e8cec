"""`molink-peer`: run a volunteer node."""

from __future__ import annotations

import argparse
import logging
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="molink-peer", description="Run a MoLink volunteer peer.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_identity(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
