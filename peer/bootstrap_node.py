"""The bootstrap node: a DHT-only meeting point, with no torch or transformers behind it.

It lives apart from server.py so that `molink-peer bootstrap` starts in about a second (libp2p's
import) instead of the several seconds a block-serving peer spends importing torch and transformers:
every local swarm (demo, tests, benchmarks) waits for its bootstrap before starting peers.
"""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path

import trio

from molink.crypto.identity import Identity
from molink.crypto.swarm_key import SwarmKey
from molink.dht.host import p2p_addrs, running_host
from molink.dht.kademlia import SwarmDHT
from molink.dht.nat import NatConfig, NatService

logger = logging.getLogger("molink.peer")

SIGNALS = (signal.SIGINT, signal.SIGTERM)


def write_ready_file(path: str | Path, content: str) -> None:
    """Atomically: a reader sees nothing or the whole address, never half of it."""
    path = Path(path)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    tmp.write_text(content + "\n")
    os.replace(tmp, path)


async def run_bootstrap_node(identity: Identity, listen: list[str], ready_file: str | None,
                             initial_peers: list[str] = (), swarm_key: SwarmKey | None = None,
                             nat: NatConfig | None = None) -> None:
    """A DHT-only node: the swarm's meeting point. Serves no blocks; relays for NATed peers (it is
    public by default: everyone dials it) and helps them find out whether they are reachable."""
    async with running_host(identity.keypair, listen, swarm_key=swarm_key) as host:
        dht = SwarmDHT(host, identity)
        async with dht.running():
            if initial_peers:
                await dht.bootstrap(list(initial_peers))
            nat_service = NatService(host, list(initial_peers), nat or NatConfig(mode="public"))
            async with trio.open_nursery() as nursery:
                await nursery.start(nat_service.run)
                full_addr = str(p2p_addrs(host)[0])
                logger.info("bootstrap node %s ready at %s", host.get_id().to_base58(), full_addr)
                if ready_file:
                    write_ready_file(ready_file, full_addr)
                with trio.open_signal_receiver(*SIGNALS) as signals:
                    async for signum in signals:
                        logger.info("got %s: stopping", signal.Signals(signum).name)
                        break
                nursery.cancel_scope.cancel()
