"""Iterative Kademlia lookups, and the contacts they leave out.

A lookup here is a plain Kademlia walk folded into the GET RPC itself (each answer carries closer
peers). It asks only peers that may be DHT servers (identify says so, or has not said) and that are
not avoided: those the owner names unresponsive (a client's struck peers) and those that let one of
our RPCs time out within SILENT_FOR seconds. A frozen peer accepts TCP and never answers, so each RPC
to it waits out RPC_TIMEOUT: without this memory every lookup that met it paid that again.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import trio
from libp2p.abc import IHost
from libp2p.kad_dht.common import BUCKET_SIZE
from libp2p.kad_dht.common import PROTOCOL_ID as KAD_PROTOCOL_ID
from libp2p.kad_dht.kad_dht import KadDHT
from libp2p.kad_dht.utils import sort_peer_ids_by_distance
from libp2p.peer.id import ID

RPC_TIMEOUT = 5.0  # per single DHT RPC; libp2p's own QUERY_TIMEOUT is 10 s
MAX_LOOKUP_ROUNDS = 6
SILENT_FOR = 30.0  # seconds a peer that let an RPC time out is left out of lookups
MAX_SILENT_ENTRIES = 1024


class ClosestPeers:
    def __init__(self, host: IHost, kad: KadDHT, unresponsive: Callable[[ID], bool]):
        self.host, self.kad, self.unresponsive = host, kad, unresponsive
        self._silent: dict[ID, float] = {}  # peer -> when one of our RPCs to it timed out

    async def query(self, key: bytes, rpc: Callable[[ID], Awaitable[list[ID] | None]], count: int) -> None:
        """Run `rpc` on the `count` peers closest to `key` that answer (iterative lookup).

        `rpc` returns the closer peers a peer told us about, or None if it failed. This is a
        plain Kademlia lookup folded into the GET RPC itself (its answers carry closer peers),
        about a third of the RPCs of find_closest_peers_network followed by the GETs.
        """
        me = self.host.get_id()
        candidates = set(self.kad.routing_table.find_local_closest_peers(key, BUCKET_SIZE))
        if len(candidates) < count:  # thin routing table: start from whoever we are connected to
            candidates.update(self.host.get_connected_peers())
        # libp2p servers put every peer that queries them into their routing table, DHT
        # clients included, and hand them out as "closer peers"; skip those identify told us
        # about, instead of paying a failed stream negotiation each time.
        candidates = {p for p in candidates if p != me and self.may_ask(p)}
        queried: set[ID] = set()
        failed: set[ID] = set()

        async def one(peer_id: ID) -> None:
            with trio.move_on_after(RPC_TIMEOUT) as scope:
                closer = await rpc(peer_id)
                if closer is not None:
                    candidates.update(p for p in closer if p != me and p not in failed and self.may_ask(p))
                    return
            if scope.cancelled_caught:
                self.went_silent(peer_id)
            failed.add(peer_id)  # let the next closest take its place
            candidates.discard(peer_id)

        for _ in range(MAX_LOOKUP_ROUNDS):
            batch = [p for p in sort_peer_ids_by_distance(key, list(candidates))[:count]
                     if p not in queried]
            if not batch:
                return
            queried.update(batch)
            async with trio.open_nursery() as nursery:
                for peer_id in batch:
                    nursery.start_soon(one, peer_id)

    def may_ask(self, peer_id: ID) -> bool:
        return self.may_be_dht_server(peer_id) and not self.avoided(peer_id)

    def avoided(self, peer_id: ID) -> bool:
        silent_at = self._silent.get(peer_id)
        return self.unresponsive(peer_id) or (silent_at is not None and trio.current_time() - silent_at < SILENT_FOR)

    def went_silent(self, peer_id: ID) -> None:
        now = trio.current_time()
        if len(self._silent) >= MAX_SILENT_ENTRIES:  # bounded: forget the periods that are over
            self._silent = {p: t for p, t in self._silent.items() if now - t < SILENT_FOR}
        self._silent[peer_id] = now

    def may_be_dht_server(self, peer_id: ID) -> bool:
        try:
            protocols = self.host.get_peerstore().get_protocols(peer_id)
        except Exception:  # PeerStoreError: never identified, so we cannot tell
            return True
        return not protocols or str(KAD_PROTOCOL_ID) in protocols
