"""Limits on what other nodes may make a DHT server store and look up (issue #10).

py-libp2p 0.8.1's KAD server already caps message size (4 MiB), concurrent inbound handlers
(12, the rest reset) and ADD_PROVIDER (10 per 10 s per peer). It has no cap on lookups served,
none on how many records one node may place, and its value store (50 000 entries) evicts the
OLDEST record when full, so a flood of junk pushes out honest announcements. Here every inbound
KAD request passes `KadRequestGuard` first:

- rate: a token bucket per remote peer id (Noise-authenticated) for lookups (FIND_NODE,
  GET_VALUE, GET_PROVIDERS, PING) and one for stores (PUT_VALUE, ADD_PROVIDER);
- quotas on NEW keys (replacing a stored record never counts): span records per publisher
  (the peer the record names and is signed by), per sending peer and in all; provider keys per
  sending peer and in all. A full store refuses newcomers instead of evicting honest records, and
  records past their own signed expiry are swept out so a flood cannot hold the space for
  libp2p's fixed 24 h.

Over a limit the stream is reset without an answer (the Kademlia spec's "on any error, reset"):
the sender's RPC fails at once and its lookup moves on to other peers; nothing waits, so other
peers are not stalled. Identities are free, so per-peer limits bound what one identity costs;
the totals bound what any number of them can cost (memory), at the price of refusing newcomers
while junk fills the store (at most until its records expire: MAX_TTL, 1 h).

Requests are read here one message at a time and handed to libp2p's own handler through
`_OneMessage`, a view of the stream that shows it exactly that message, so every reply, check
and validator of libp2p's handler runs unchanged.
"""

from __future__ import annotations

import logging
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass
from typing import Any

import msgpack
import trio
import varint
from libp2p.custom_types import TProtocol
from libp2p.io.exceptions import IncompleteReadError
from libp2p.kad_dht.common import MAX_DHT_MESSAGE_SIZE
from libp2p.kad_dht.common import PROTOCOL_ID as KAD_PROTOCOL_ID
from libp2p.kad_dht.pb.kademlia_pb2 import Message
from libp2p.utils.varint import read_varint_prefixed_bytes_limited

from molink.dht.records import MAX_RECORD_BYTES

logger = logging.getLogger(__name__)

STORE_TYPES = frozenset({Message.MessageType.PUT_VALUE, Message.MessageType.ADD_PROVIDER})


@dataclass(frozen=True)
class DHTLimits:
    # Lookups: one client's find_spans asks a server ~8 GET_PROVIDERS (one per shard) plus a
    # GET_VALUE per candidate it cannot ask directly; a bootstrap's routing-table refresh sends a
    # FIND_NODE per bucket (tens); the swarm map refreshes every 15 s. A burst of 256 and 32/s
    # leave that a wide margin while a flood gets 32 answers per second per identity.
    lookup_burst: int = 256
    lookups_per_second: float = 32.0
    # Stores: a peer re-announces every 30 s (one PUT_VALUE + one ADD_PROVIDER per model) and
    # withdraws once; test swarms announce faster. 64 and 4/s is ~100x the normal need.
    store_burst: int = 64
    stores_per_second: float = 4.0
    # A peer announces one record per model it serves: 16 models on one machine is plenty.
    records_per_publisher: int = 16
    # Senders normally store only their own records (withdrawals too); a few relayed copies fit.
    records_per_sender: int = 64
    # 8192 x MAX_RECORD_BYTES (6 KiB) = 48 MiB at worst; thousands of peers per server at best.
    max_records: int = 8192
    # A peer provides one shard key per model (kademlia.provider_key).
    provider_keys_per_sender: int = 64
    max_provider_keys: int = 16384
    # Remote peers whose buckets are remembered (least recently seen forgotten first).
    max_tracked_peers: int = 4096
    # A KAD stream that sends nothing for this long is closed (libp2p's handler waits forever).
    idle_timeout: float = 30.0


class TokenBucket:
    __slots__ = ("capacity", "rate", "tokens", "stamp")

    def __init__(self, capacity: int, rate: float, now: float):
        self.capacity, self.rate, self.tokens, self.stamp = capacity, rate, float(capacity), now

    def take(self, now: float) -> bool:
        self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


class PeerRateLimiter:
    """A token bucket per remote peer, for a bounded number of peers."""

    def __init__(self, capacity: int, rate: float, max_peers: int):
        self.capacity, self.rate, self.max_peers = capacity, rate, max_peers
        self.buckets: OrderedDict[str, TokenBucket] = OrderedDict()

    def allow(self, peer: str, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        bucket = self.buckets.get(peer)
        if bucket is None:
            bucket = self.buckets[peer] = TokenBucket(self.capacity, self.rate, now)
            if len(self.buckets) > self.max_peers:
                self.buckets.popitem(last=False)
        else:
            self.buckets.move_to_end(peer)
        return bucket.take(now)


def _publisher_and_expiry(value: bytes) -> tuple[str, float] | None:
    """(peer_id, expires_at) of a span-record envelope, unverified (the validator verifies it
    before anything is stored; this only decides whether to refuse early). None if unreadable."""
    if len(value) > MAX_RECORD_BYTES:
        return None
    try:
        envelope = msgpack.unpackb(value, raw=False, max_str_len=MAX_RECORD_BYTES, max_bin_len=MAX_RECORD_BYTES)
        record = envelope["record"]
        peer_id, expires_at = record["peer_id"], record["expires_at"]
    except Exception:  # any malformed input: the validator will refuse it with the reason
        return None
    if not isinstance(peer_id, str) or not isinstance(expires_at, (int, float)):
        return None
    return peer_id, float(expires_at)


@dataclass
class _StoredRecord:
    sender: str
    publisher: str
    expires_at: float


class RecordQuotas:
    """Who placed which value and provider keys in a KadDHT's stores, and the caps on that."""

    def __init__(self, dht: Any, limits: DHTLimits):
        self.dht, self.limits = dht, limits
        self.records: dict[bytes, _StoredRecord] = {}
        self.providers: dict[str, set[bytes]] = {}

    # ------------------------------------------------------------ values

    def sweep(self, now: float | None = None) -> None:
        """Forget keys libp2p dropped; remove records past their own signed expiry."""
        now = time.time() if now is None else now
        store = self.dht.value_store.store
        for key, entry in list(self.records.items()):
            if key not in store:
                del self.records[key]
            elif entry.expires_at < now:
                self.dht.value_store.remove(key)
                del self.records[key]

    def refuse_value(self, key: bytes, value: bytes, sender: str) -> str | None:
        """Why a PUT_VALUE of a NEW key must be refused, or None."""
        if key in self.dht.value_store.store:
            return None  # a newer record for a stored key: the validator decides
        parsed = _publisher_and_expiry(value)
        if parsed is None:
            return None  # malformed: libp2p's validator refuses it (with the reason in its log)
        publisher, _ = parsed
        for attempt in range(2):  # counts may include keys libp2p dropped: sweep, count again
            reason = self._over_value_quota(publisher, sender)
            if reason is None or attempt:
                return reason
            self.sweep()
        return None

    def _over_value_quota(self, publisher: str, sender: str) -> str | None:
        limits = self.limits
        if len(self.dht.value_store.store) >= limits.max_records:
            return f"the store holds {limits.max_records} records"
        by_publisher = sum(1 for r in self.records.values() if r.publisher == publisher)
        if by_publisher >= limits.records_per_publisher:
            return f"publisher {publisher} already has {by_publisher} records here"
        by_sender = sum(1 for r in self.records.values() if r.sender == sender)
        if by_sender >= limits.records_per_sender:
            return f"sender already placed {by_sender} records here"
        return None

    def note_value(self, key: bytes, value: bytes, sender: str) -> None:
        """After libp2p's handler ran: remember a newly stored key's owners."""
        if key in self.records or key not in self.dht.value_store.store:
            return
        parsed = _publisher_and_expiry(value)
        if parsed is not None:
            self.records[key] = _StoredRecord(sender, parsed[0], parsed[1])

    # ------------------------------------------------------------ providers

    def refuse_provider(self, key: bytes, sender: str) -> str | None:
        store = self.dht.provider_store.providers
        if sender in store.get(key, {}):
            return None  # a refresh of an entry it already has
        if sender in self.providers:  # forget keys whose entries libp2p has expired meanwhile
            self.providers[sender] = {k for k in self.providers[sender] if sender in store.get(k, {})}
        mine = self.providers.get(sender, ())
        if len(mine) >= self.limits.provider_keys_per_sender:
            return f"sender already provides {len(mine)} keys here"
        if key not in store and len(store) >= self.limits.max_provider_keys:
            return f"the provider store holds {self.limits.max_provider_keys} keys"
        return None

    def note_provider(self, key: bytes, sender: str) -> None:
        if sender in self.dht.provider_store.providers.get(key, {}):
            self.providers.setdefault(sender, set()).add(key)
        if len(self.providers) > self.limits.max_tracked_peers:  # drop senders whose keys all expired
            store = self.dht.provider_store.providers
            for peer in [p for p, keys in self.providers.items() if not any(p in store.get(k, {}) for k in keys)]:
                del self.providers[peer]


class _OneMessage:
    """The stream as libp2p's KAD handler sees it: exactly one request, then EOF; replies and
    resets go to the real stream, and closing is left to the guard (which owns the stream)."""

    def __init__(self, stream: Any, payload: bytes):
        self._stream = stream
        self._pending = bytearray(varint.encode(len(payload)) + payload)
        self.muxed_conn = stream.muxed_conn
        self.metric_send_channel = getattr(stream, "metric_send_channel", None)
        self.was_reset = False

    async def read(self, n: int | None = None) -> bytes:
        n = len(self._pending) if n is None else n
        data = bytes(self._pending[:n])
        del self._pending[:n]
        return data

    async def write(self, data: bytes) -> None:
        await self._stream.write(data)

    async def close(self) -> None:
        return None

    async def reset(self) -> None:
        self.was_reset = True
        await self._stream.reset()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


class KadRequestGuard:
    """Replaces KadDHT's stream handler on its host; see the module doc."""

    def __init__(self, dht: Any, limits: DHTLimits | None = None):
        self.dht = dht
        self.limits = limits = limits or DHTLimits()
        self.lookups = PeerRateLimiter(limits.lookup_burst, limits.lookups_per_second, limits.max_tracked_peers)
        self.stores = PeerRateLimiter(limits.store_burst, limits.stores_per_second, limits.max_tracked_peers)
        self.quotas = RecordQuotas(dht, limits)
        self.refused: Counter[str] = Counter()  # why requests were refused, for logs and tests

    def install(self) -> None:
        self.dht.host.set_stream_handler(TProtocol(KAD_PROTOCOL_ID), self.handle_stream)

    def admit(self, message: Message, sender: str) -> str | None:
        """None to serve the request, else why it is refused."""
        is_store = message.type in STORE_TYPES
        if not (self.stores if is_store else self.lookups).allow(sender):
            return "store_rate" if is_store else "lookup_rate"
        reason = None
        if message.type == Message.MessageType.PUT_VALUE and message.HasField("record"):
            reason = self.quotas.refuse_value(message.record.key, message.record.value, sender)
            kind = "record_quota"
        elif message.type == Message.MessageType.ADD_PROVIDER:
            reason = self.quotas.refuse_provider(message.key, sender)
            kind = "provider_quota"
        if reason is not None:
            logger.debug("DHT store from %s refused: %s", sender, reason)
            return kind
        return None

    async def handle_stream(self, stream: Any) -> None:
        sender = str(stream.muxed_conn.peer_id)
        try:
            while True:
                payload = None
                with trio.move_on_after(self.limits.idle_timeout):
                    payload = await read_varint_prefixed_bytes_limited(stream, MAX_DHT_MESSAGE_SIZE)
                if payload is None:
                    await stream.close()  # idle: nothing more is coming
                    return
                message = Message()
                message.ParseFromString(payload)  # DecodeError: reset below
                refusal = self.admit(message, sender)
                if refusal is not None:
                    self.refused[refusal] += 1
                    await stream.reset()
                    return
                view = _OneMessage(stream, payload)
                await self.dht.handle_stream(view)  # libp2p's handler, with its own limiter and checks
                if view.was_reset:
                    return
                self._note_stored(message, sender)
        except IncompleteReadError as exc:
            if exc.received_bytes == 0:  # EOF between requests: the normal end of a stream
                with trio.move_on_after(1.0):
                    await stream.close()
                return
            await self._reset(stream, sender, exc)
        except Exception as exc:  # a bad message or a dead stream: end this stream, never the host
            await self._reset(stream, sender, exc)

    async def _reset(self, stream: Any, sender: str, exc: Exception) -> None:
        logger.debug("DHT stream from %s ended: %s", sender, exc)
        with trio.move_on_after(1.0):
            try:
                await stream.reset()
            except Exception:
                pass

    def _note_stored(self, message: Message, sender: str) -> None:
        if message.type == Message.MessageType.PUT_VALUE and message.HasField("record"):
            self.quotas.note_value(message.record.key, message.record.value, sender)
        elif message.type == Message.MessageType.ADD_PROVIDER:
            self.quotas.note_provider(message.key, sender)
