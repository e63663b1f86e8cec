"""Span records in py-libp2p 0.8.1's Kademlia DHT: announce, withdraw, list every peer of a model.

Storage layout (a DHT value is ONE value per key, so peers never share a key):
- value key  "/molink/" + b32(H(model_key, peer_id))  ->  that peer's signed SpanRecord envelope
  (a hash, not the readable pair: see `value_key` for the 50-byte FIND_NODE limit).
  Our validator (namespace "molink") refuses, on every store and every read, a value that is
  not signed by the peer named in the key, is for another model, is expired or too far in the
  future, or is oversized; `select` keeps the highest seq. A withdrawal is a higher-seq record
  with an empty span under the same key, so it replaces the announcement everywhere it lands.
- provider keys  multihash(sha256("molink/providers/v1\\0<model_key>\\0<shard>"))  for shards
  0..PROVIDER_SHARDS-1; a peer ADD_PROVIDERs itself under shard = H(peer_id) % PROVIDER_SHARDS.
  Provider records cannot be forged for another peer (libp2p checks provider == sender) and
  cannot be signed-away, so they are only the *candidate list*; the value key decides whether
  a candidate is live. Shards exist because each storing node keeps at most 20 (k) providers
  per key and ignores newcomers while stale ones linger for 48 h: 8 shards allow ~160 peers.
A client lists a model by collecting the candidates of all shards, then fetching and verifying
each candidate's value; withdrawn, expired, forged or missing ones drop out.

Two libp2p shortcuts are bypassed on purpose (trap 7): `find_providers` returns the LOCAL list
as soon as it is non-empty (a peer that provides sees only itself), and `get_value` returns the
local copy if any (and caches every fetched value locally for 24 h, so a client would never see
a re-announce or a withdrawal again). We query the closest peers ourselves, merge with local.
"""

from __future__ import annotations

import base64
import hashlib
import inspect
import logging
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager

import trio
from libp2p.abc import IHost
from libp2p.kad_dht.common import PROTOCOL_ID as KAD_PROTOCOL_ID
from libp2p.kad_dht.kad_dht import DHTMode, KadDHT
from libp2p.kad_dht.utils import sort_peer_ids_by_distance
from libp2p.peer.id import ID
from libp2p.records.validator import Validator
from libp2p.tools.anyio_service import background_trio_service

from molink.crypto.identity import Identity
from molink.dht.closest_peers import RPC_TIMEOUT, ClosestPeers
from molink.dht.dht_limits import DHTLimits, KadRequestGuard
from molink.dht.records import (
    DEFAULT_TTL,
    RecordError,
    SpanRecord,
    StaleRecord,
    WrongKey,
    best_record_index,
    decode_and_verify,
)

logger = logging.getLogger(__name__)


class _DropCleanEofWarnings(logging.Filter):
    """py-libp2p 0.8.1's KAD server logs a WARNING each time a client closes its stream after
    a request (StreamEOF instead of its "clean EOF" case), i.e. once per DHT RPC served."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (str(record.msg).startswith("Failed to read DHT message from stream")
                    and record.args and type(record.args[0]).__name__ == "StreamEOF")


if not any(isinstance(f, _DropCleanEofWarnings)
           for f in logging.getLogger("libp2p.kad_dht.kad_dht").filters):
    logging.getLogger("libp2p.kad_dht.kad_dht").addFilter(_DropCleanEofWarnings())

NAMESPACE = "molink"
PROVIDER_SHARDS = 8  # protocol constant: announcers and clients must agree on it
PROVIDER_QUERY_PEERS = 4  # closest peers asked per shard (ADD_PROVIDER went to up to 20)
# closest peers that ANSWER which also get our ADD_PROVIDER (announce): at least the ones clients ask
PROVIDE_LIVE_PEERS = 2 * PROVIDER_QUERY_PEERS
VALUE_QUERY_PEERS = 4  # closest replicas asked for a value when its peer did not answer
# Asking a candidate for its own record includes dialling it; a dead one (its provider entries
# linger 48 h) must not stall the listing, and its DHT copy expires soon anyway.
DIRECT_TIMEOUT = 2.0
LOOKUP_CONCURRENCY = 16  # candidates fetched at once in find_spans
MAX_CANDIDATES = 512  # bound the work a flood of provider records can cause
IDENTIFY_TIMEOUT = 5.0
SECOND_ANNOUNCE_AFTER = 2.0  # seconds after a peer's first announce (see run_announcer)

__all__ = [
    "NAMESPACE", "PROVIDER_SHARDS", "SpanRecordValidator", "SwarmDHT", "check_value_key",
    "provider_key", "provider_shard", "value_key",
]


def value_key(model_key: str, peer_id: str) -> str:
    """"/molink/" + base32(first 200 bits of sha256(model_key, peer_id)): 48 bytes.

    Not the readable "/molink/<model>/<peer>": py-libp2p 0.8.1 servers reset any FIND_NODE
    whose key is neither a multihash nor 2..50 bytes long, and both put_value and our lookups
    send the value key as the FIND_NODE target. With a longer key every lookup silently fell
    back to "whoever we are connected to". The validator recomputes this key from the
    record's own model_key and peer_id, which binds the record to its key just as tightly.
    """
    digest = hashlib.sha256(f"molink/span/v1\x00{model_key}\x00{peer_id}".encode()).digest()
    return f"/{NAMESPACE}/" + base64.b32encode(digest[:25]).decode().lower()


def check_value_key(key: str, record: SpanRecord) -> None:
    """WrongKey unless `key` is the value key of `record`'s own model and peer."""
    if value_key(record.model_key, record.peer_id) != key:
        raise WrongKey("record is for another model or peer than its DHT key")


def provider_shard(peer_id: str) -> int:
    return hashlib.sha256(peer_id.encode()).digest()[0] % PROVIDER_SHARDS


def provider_key(model_key: str, shard: int) -> bytes:
    digest = hashlib.sha256(f"molink/providers/v1\x00{model_key}\x00{shard}".encode()).digest()
    return b"\x12\x20" + digest  # a sha2-256 multihash, like every other provider key


class SpanRecordValidator(Validator):
    """Plugged into KadDHT: runs on every PUT_VALUE we receive and every value we store."""

    def validate(self, key: str, value: bytes) -> None:
        check_value_key(key, decode_and_verify(value))

    def select(self, key: str, values: list[bytes]) -> int:
        return best_record_index(values, accept=lambda record: check_value_key(key, record))


class SwarmDHT:
    """One node's view of the span-record DHT. Use `async with dht.running():` around its life."""

    def __init__(self, host: IHost, identity: Identity | None = None, *,
                 mode: DHTMode = DHTMode.SERVER, limits: DHTLimits | None = None) -> None:
        self.host = host
        self.identity = identity
        # Peers the owner found unresponsive (a client's struck peers): never asked in lookups. A
        # frozen peer still accepts TCP, so each RPC to it would wait out RPC_TIMEOUT, and a span
        # lookup that meets it would outlast a recovering client's lookup deadline every time.
        self.unresponsive: Callable[[ID], bool] = lambda peer_id: False
        self.dht = KadDHT(host, mode, strict_validation=True)
        self.lookups = ClosestPeers(host, self.dht, lambda peer_id: self.unresponsive(peer_id))
        # strict (above): keys outside registered namespaces are refused, so nobody can use our
        # servers as free storage under plain keys (libp2p's default accepts anything).
        self.dht.register_validator(NAMESPACE, SpanRecordValidator())
        # rate limits and record quotas in front of libp2p's KAD server (dht_limits.py)
        self.guard = KadRequestGuard(self.dht, limits) if mode == DHTMode.SERVER else None
        if self.guard is not None:
            self.guard.install()

    @asynccontextmanager
    async def running(self) -> AsyncIterator["SwarmDHT"]:
        """Run the KadDHT service (refresh, republish, cleanup loops); stop it on exit."""
        async with background_trio_service(self.dht):
            yield self

    # ------------------------------------------------------------------ bootstrap

    async def bootstrap(self, addrs: Sequence[str], *, timeout: float = 10.0) -> int:
        """Connect to bootstrap peers, identify them, then fill the routing table.

        Identify first (trap 7): the routing table admits a peer only if identify says it
        speaks the KAD protocol; with no identify data yet it admits anybody, DHT clients
        included, and every later lookup wastes a round trip on them. Returns how many
        bootstrap peers were added; lookups run even with 0 (peers may have dialled us).
        """
        from molink.dht.host import connect_peer  # host <- kademlia, not a cycle

        async def join(addr: str) -> None:
            try:
                peer_id = await connect_peer(self.host, addr, timeout=timeout)  # type: ignore
            except Exception as exc:  # ConnectError, or a bad address (several libp2p types)
                logger.warning("bootstrap peer %s unreachable: %s", addr, exc)
                return
            if await self._wait_identified(peer_id) and await self.dht.add_peer(peer_id):
                added.append(peer_id)
            else:
                logger.warning("bootstrap peer %s is not a DHT server", peer_id)

        added: list[ID] = []
        async with trio.open_nursery() as nursery:
            for addr in addrs:
                nursery.start_soon(join, addr)
        with trio.move_on_after(timeout):
            await self.dht.refresh_routing_table()  # self-lookup + one per bucket
        return len(added)

    async def _wait_identified(self, peer_id: ID) -> bool:
        """True once identify lists KAD for the peer; False if it lists protocols without it."""
        store = self.host.get_peerstore()
        with trio.move_on_after(IDENTIFY_TIMEOUT):
            while True:
                try:
                    protocols = store.get_protocols(peer_id)
                except Exception:  # PeerStoreError: nothing known about it yet
                    protocols = []
                if protocols:
                    return str(KAD_PROTOCOL_ID) in protocols
                await trio.sleep(0.02)
        logger.warning("identify of %s timed out; adding it unchecked", peer_id)
        return True

    # ------------------------------------------------------------------ announce / withdraw

    def _identity(self, identity: Identity | None) -> Identity:
        identity = identity or self.identity
        if identity is None:
            raise ValueError("no identity: pass one to SwarmDHT() or to this call")
        return identity

    async def announce(self, record: SpanRecord, identity: Identity | None = None) -> None:
        """Store `record` (signed by `identity`) at the closest peers and list us as provider."""
        identity = self._identity(identity)
        value = record.sign(identity)
        decode_and_verify(value)  # an expired/odd record fails here, typed, not deep in libp2p
        try:
            await self.dht.put_value(value_key(record.model_key, record.peer_id), value)
        except ValueError as exc:  # "Refusing to replace newer value with the older one"
            raise StaleRecord(str(exc)) from exc
        key = provider_key(record.model_key, provider_shard(record.peer_id))
        if record.is_withdrawal:
            # Provider records cannot be revoked remotely (they live 48 h); stop renewing ours
            # and drop the local one so our own listings are right at once.
            self.dht.provider_store.providing_keys.discard(key)
            self.dht.provider_store.providers.get(key, {}).pop(str(self.host.get_id()), None)
        else:
            # one after the other: side by side, the two lookups dial the same peers at once and
            # lose connections to py-libp2p's one-connection-per-peer races (measured: 3 of 6 runs
            # of test_dht_live's dead-peers test then missed a live peer)
            await self.dht.provider_store.provide(key)
            await self._provide_to_live_peers(key)

    async def _provide_to_live_peers(self, key: bytes) -> None:
        """ADD_PROVIDER at the PROVIDE_LIVE_PEERS peers closest to `key` that answer.

        libp2p's provide() sends to the 20 closest peers it has HEARD of, dead or alive: its lookup
        never drops a peer that failed to answer. After enough churn the 20 closest known to a
        shard key can all be dead, and the record then lands nowhere, while clients ask the
        closest peers that answer (find_providers): a peer that joined then stays invisible
        (seen here after ~30 peers had died: a kill-9 soak found no route to a span two live
        peers served). This lookup is the clients' own, so both sides meet at the same peers.
        """
        store = self.dht.provider_store
        answered: list[ID] = []

        async def probe(peer_id: ID) -> list[ID] | None:
            # Private in 0.8.1 (pinned): one GET_PROVIDERS RPC; any error gives ([], []).
            providers, closer = await store._get_providers_from_peer_with_closers(peer_id, key)
            if not providers and not closer:
                return None
            answered.append(peer_id)
            return closer

        await self.lookups.query(key, probe, PROVIDE_LIVE_PEERS)

        async def add(peer_id: ID) -> None:
            with trio.move_on_after(RPC_TIMEOUT):
                await store._send_add_provider(peer_id, key)  # fire and forget (no echo); logs failures

        async with trio.open_nursery() as nursery:
            for peer_id in sort_peer_ids_by_distance(key, answered)[:PROVIDE_LIVE_PEERS]:
                nursery.start_soon(add, peer_id)

    async def withdraw(self, model_key: str, identity: Identity | None = None, *,
                       version: str = "0", ttl: float = DEFAULT_TTL) -> SpanRecord:
        """Replace our record for `model_key` with a signed withdrawal; returns it."""
        identity = self._identity(identity)
        record = SpanRecord.withdrawal(identity, model_key, version, ttl=ttl)
        key = value_key(model_key, record.peer_id).encode()
        value = record.sign(identity)

        async def tell(peer_id: ID) -> None:
            with trio.move_on_after(DIRECT_TIMEOUT):
                try:
                    await self.dht.value_store._store_at_peer(peer_id, key, value)
                except Exception as exc:  # a dead contact: the others still hear it
                    logger.debug("withdrawal not stored at %s: %s", peer_id, exc)

        # A leaving peer has seconds, and py-libp2p's put_value can stall that long on one dead
        # contact in its lookup: also hand the withdrawal straight to every peer we know, in
        # parallel, each with its own short deadline.
        async with trio.open_nursery() as nursery:
            for peer_id in self.dht.routing_table.get_peer_ids():
                nursery.start_soon(tell, peer_id)
            await self.announce(record, identity)
        return record

    async def run_announcer(
        self,
        get_record: Callable[[], SpanRecord | None | Awaitable[SpanRecord | None]],
        interval: float,
        *,
        identity: Identity | None = None,
        ttl: float = DEFAULT_TTL,
        withdraw_on_exit: bool = False,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Re-announce `get_record()` every ~interval s (new seq, expiry now+ttl) until cancelled.

        `get_record` (sync or async) returns the current state; None means "serving nothing
        now", which withdraws what was announced before. Failures are logged and retried at
        the next tick: a flaky network must not kill the peer. `task_status.started()` comes
        after the first attempt, so `await nursery.start(...)` returns once we are findable.
        """
        if not 0 < interval * 1.1 < ttl:
            raise ValueError("interval (with 10% jitter) must be positive and below ttl")
        identity = self._identity(identity)
        announced: SpanRecord | None = None
        started = False
        try:
            while True:
                current = get_record()
                if inspect.isawaitable(current):
                    current = await current
                try:
                    # A hung announce must not delay the next one past the record's expiry.
                    with trio.move_on_after(interval) as scope:
                        if current is not None:
                            await self.announce(current.refreshed(ttl=ttl), identity)
                            announced = current
                        elif announced is not None:
                            await self.withdraw(announced.model_key, identity,
                                                version=announced.version, ttl=ttl)
                            announced = None
                    if scope.cancelled_caught:
                        logger.warning("span announce took over %.0f s; abandoned", interval)
                except Exception:
                    logger.warning("span announce failed; retrying in %.0f s", interval,
                                   exc_info=True)
                delay = interval * random.uniform(0.9, 1.1)  # jitter: peers started together drift apart
                if not started:
                    started = True
                    task_status.started()
                    # The first announce reached the peers known at that moment; peers joining
                    # together know few of each other yet: announce again once they have met.
                    delay = min(delay, SECOND_ANNOUNCE_AFTER)
                await trio.sleep(delay)
        finally:
            if withdraw_on_exit and announced is not None:
                with trio.CancelScope(shield=True), trio.move_on_after(RPC_TIMEOUT):
                    try:
                        await self.withdraw(announced.model_key, identity,
                                            version=announced.version, ttl=ttl)
                    except Exception:
                        logger.warning("withdraw on exit failed", exc_info=True)

    # ------------------------------------------------------------------ lookup

    async def find_spans(self, model_key: str) -> list[SpanRecord]:
        """Every live, verified span of `model_key`: one record per peer, its highest seq."""
        candidates = await self.find_providers(model_key)
        found: dict[str, SpanRecord] = {}
        limiter = trio.CapacityLimiter(LOOKUP_CONCURRENCY)

        async def one(peer_id: ID) -> None:
            async with limiter:
                record = await self.find_record(model_key, peer_id)
            if record is not None and not record.is_withdrawal:
                found[record.peer_id] = record

        async with trio.open_nursery() as nursery:
            for peer_id in candidates:
                nursery.start_soon(one, peer_id)
        return sorted(found.values(), key=lambda r: (r.start, r.end, r.peer_id))

    async def find_providers(self, model_key: str) -> list[ID]:
        """Candidate peers of all shards: local store AND the closest peers, deduplicated."""
        seen: dict[ID, None] = {}

        async def ask(peer_id: ID, key: bytes) -> list[ID] | None:
            # Private in 0.8.1 (pinned): one GET_PROVIDERS RPC; any error gives ([], []).
            providers, closer = await self.dht.provider_store.\
                _get_providers_from_peer_with_closers(peer_id, key)
            for info in providers:
                seen.setdefault(info.peer_id, None)
            return closer if providers or closer else None

        async def shard(index: int) -> None:
            key = provider_key(model_key, index)
            for info in self.dht.provider_store.get_providers(key):
                seen.setdefault(info.peer_id, None)
            await self.lookups.query(key, lambda peer_id: ask(peer_id, key),
                                      PROVIDER_QUERY_PEERS)

        async with trio.open_nursery() as nursery:
            for index in range(PROVIDER_SHARDS):
                nursery.start_soon(shard, index)
        return list(seen)[:MAX_CANDIDATES]

    async def find_record(self, model_key: str, peer_id: ID | str) -> SpanRecord | None:
        """The highest-seq valid record (withdrawals included) for one peer, or None.

        Asks the peer itself first: put_value stores a peer's latest record in its own store
        before anywhere else, so one RPC usually settles it. Only when that fails (peer
        unreachable, DHT client, no record) do we ask the replicas closest to the key.
        """
        pid = peer_id if isinstance(peer_id, ID) else ID.from_base58(peer_id)
        key = value_key(model_key, pid.to_base58()).encode()
        expect = {"expected_model_key": model_key, "expected_peer_id": pid.to_base58()}
        local = self.dht.value_store.get(key)
        values: list[bytes] = [local.value] if local is not None else []

        async def ask(remote: ID, timeout: float = RPC_TIMEOUT) -> list[ID] | None:
            with trio.move_on_after(timeout) as scope:
                # Private in 0.8.1 (pinned): one GET_VALUE RPC; any error gives (None, []).
                record, closer = await self.dht.value_store._get_from_peer(
                    remote, key, return_record=True, return_closer_peers=True)
                if record is not None and getattr(record, "value", None):
                    values.append(record.value)
                    return closer
                return closer or None  # nothing at all: an error or a useless peer
            if scope.cancelled_caught:
                self.lookups.went_silent(remote)
            return None

        if pid != self.host.get_id() and not self.lookups.avoided(pid):
            before = len(values)
            await ask(pid, DIRECT_TIMEOUT)
            if len(values) > before and _best(values[before:], expect) is not None:
                return _best(values, expect)
        await self.lookups.query(key, ask, VALUE_QUERY_PEERS)
        return _best(values, expect)

def _best(values: list[bytes], expect: dict[str, str]) -> SpanRecord | None:
    index = best_record_index(values, **expect)
    try:
        return decode_and_verify(values[index], **expect) if values else None
    except RecordError:  # index 0 is also the answer when nothing is valid
        return None
