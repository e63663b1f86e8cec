"""DHT rate limits and record quotas (dht/dht_limits.py) through REAL libp2p hosts on 127.0.0.1.

One DHT server with small limits, an attacker and honest nodes in DHT client mode that talk to it
with libp2p's own KAD RPCs (PUT_VALUE, GET_VALUE, ADD_PROVIDER), so every refusal goes through
the real stream handler.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio
from libp2p.kad_dht.kad_dht import DHTMode

from molink.crypto.identity import Identity
from molink.dht.dht_limits import DHTLimits, PeerRateLimiter
from molink.dht.host import connect_peer, p2p_addrs, running_host
from molink.dht.kademlia import SwarmDHT, provider_key, value_key
from molink.dht.model_keys import model_dht_key
from molink.dht.records import SpanRecord

DEADLINE = 30.0


def model(i: int) -> str:
    return model_dht_key(f"model-{i}", {"num_hidden_layers": 4}, f"{i:02x}" * 32)


def signed(identity: Identity, model_key: str, ttl: float = 180.0) -> bytes:
    return SpanRecord.create(identity, model_key, 0, 4, ["/ip4/127.0.0.1/tcp/1"], 10.0, 100, "t",
                             ttl=ttl).sign(identity)


@asynccontextmanager
async def node(limits: DHTLimits | None = None, mode: DHTMode = DHTMode.SERVER,
               identity: Identity | None = None) -> AsyncIterator[SwarmDHT]:
    identity = identity or Identity.generate()
    async with running_host(identity.keypair) as host, \
            SwarmDHT(host, identity, mode=mode, limits=limits).running() as dht:
        yield dht


@asynccontextmanager
async def server_and_clients(limits: DHTLimits, clients: int) -> AsyncIterator[tuple[SwarmDHT, list[SwarmDHT]]]:
    async with node(limits) as server:
        addr = str(p2p_addrs(server.host)[0])
        async with _clients(clients, addr) as others:
            yield server, others


@asynccontextmanager
async def _clients(count: int, addr: str) -> AsyncIterator[list[SwarmDHT]]:
    if count == 0:
        yield []
        return
    async with node(mode=DHTMode.CLIENT) as first, _clients(count - 1, addr) as rest:
        await connect_peer(first.host, addr)
        yield [first, *rest]


async def put(sender: SwarmDHT, server: SwarmDHT, value: bytes, model_key: str, publisher: Identity) -> bool:
    key = value_key(model_key, publisher.peer_id.to_base58()).encode()
    return await sender.dht.value_store._store_at_peer(server.host.get_id(), key, value)


async def get(client: SwarmDHT, server: SwarmDHT, model_key: str, publisher: Identity) -> bytes | None:
    key = value_key(model_key, publisher.peer_id.to_base58()).encode()
    record, _closer = await client.dht.value_store._get_from_peer(
        server.host.get_id(), key, return_record=True, return_closer_peers=True)
    return getattr(record, "value", None) or None


def test_token_bucket_refills_at_its_rate_and_forgets_old_peers() -> None:
    limiter = PeerRateLimiter(capacity=3, rate=2.0, max_peers=2)
    assert [limiter.allow("a", now=0.0) for _ in range(4)] == [True, True, True, False]
    assert limiter.allow("a", now=0.5)  # 0.5 s x 2/s = one token back
    assert not limiter.allow("a", now=0.5)
    limiter.allow("b", now=1.0)
    limiter.allow("c", now=1.0)
    assert list(limiter.buckets) == ["b", "c"]  # bounded: the least recently seen peer is forgotten


async def test_lookup_flood_is_refused_while_other_peers_are_served() -> None:
    limits = DHTLimits(lookup_burst=8, lookups_per_second=1.0)
    with trio.fail_after(DEADLINE):
        async with server_and_clients(limits, 2) as (server, (attacker, honest)):
            publisher = Identity.generate()
            value = signed(publisher, model(0))
            assert await put(honest, server, value, model(0), publisher)
            started = time.monotonic()
            answers = [await get(attacker, server, model(0), publisher) for _ in range(30)]
            elapsed = time.monotonic() - started
            served = sum(a == value for a in answers)
            # the burst, plus what refilled meanwhile; every refusal was immediate (no stall)
            assert 8 <= served <= 8 + int(elapsed * 1.0) + 1, (served, elapsed)
            assert server.guard.refused["lookup_rate"] == 30 - served
            assert elapsed < 10, "refused lookups must fail at once, not time out"
            # another peer is still served, and so is the attacker once its bucket refills
            assert await get(honest, server, model(0), publisher) == value
            await trio.sleep(1.1)
            assert await get(attacker, server, model(0), publisher) == value


async def test_record_quotas_per_publisher_per_sender_and_in_all() -> None:
    limits = DHTLimits(records_per_publisher=3, records_per_sender=5, max_records=7)
    with trio.fail_after(DEADLINE):
        async with server_and_clients(limits, 2) as (server, (attacker, honest)):
            me = attacker.identity
            # one publisher: 3 records (3 models), then refused
            stored = [await put(attacker, server, signed(me, model(i)), model(i), me) for i in range(5)]
            assert stored == [True, True, True, False, False]
            assert server.guard.refused["record_quota"] == 2
            # replacing a stored record (a re-announce) never counts against a quota
            assert await put(attacker, server, signed(me, model(0)), model(0), me)
            # one sender relaying records of fresh identities: 5 records in all from it
            sybils = [Identity.generate() for _ in range(4)]
            relayed = [await put(attacker, server, signed(s, model(0)), model(0), s) for s in sybils]
            assert relayed == [True, True, False, False]
            # the whole store: 5 records + 2 honest ones = 7, then even honest newcomers are refused
            # (refusing keeps honest records in; libp2p's own store would evict the oldest)
            publishers = [Identity.generate() for _ in range(3)]
            results = [await put(honest, server, signed(p, model(1)), model(1), p) for p in publishers]
            assert results == [True, True, False]
            assert len(server.dht.value_store.store) == 7
            # the attacker's records are still readable; nothing crashed
            assert await get(honest, server, model(0), me) is not None


async def test_expired_records_free_their_quota() -> None:
    limits = DHTLimits(records_per_publisher=2)
    with trio.fail_after(DEADLINE):
        async with server_and_clients(limits, 1) as (server, (attacker,)):
            me = attacker.identity
            assert await put(attacker, server, signed(me, model(0), ttl=1.5), model(0), me)
            assert await put(attacker, server, signed(me, model(1), ttl=1.5), model(1), me)
            assert not await put(attacker, server, signed(me, model(2)), model(2), me)
            await trio.sleep(2.0)  # both records are past their own signed expiry
            assert await put(attacker, server, signed(me, model(2)), model(2), me)
            assert len(server.dht.value_store.store) == 1  # the expired ones were swept out


async def test_provider_keys_per_sender_are_capped() -> None:
    limits = DHTLimits(provider_keys_per_sender=3)
    with trio.fail_after(DEADLINE):
        async with server_and_clients(limits, 2) as (server, (attacker, honest)):
            for i in range(5):  # ADD_PROVIDER is fire-and-forget: the server's state tells
                await attacker.dht.provider_store._send_add_provider(server.host.get_id(), provider_key(model(i), 0))
            me = str(attacker.host.get_id())
            store = server.dht.provider_store.providers
            while sum(me in providers for providers in store.values()) < 3 or \
                    server.guard.refused["provider_quota"] < 2:
                await trio.sleep(0.02)
            await trio.sleep(0.2)
            assert sum(me in providers for providers in store.values()) == 3
            assert server.guard.refused["provider_quota"] == 2
            # a refresh of a key it already provides is not a new key; other senders are unaffected
            await attacker.dht.provider_store._send_add_provider(server.host.get_id(), provider_key(model(0), 0))
            await honest.dht.provider_store._send_add_provider(server.host.get_id(), provider_key(model(4), 0))
            while str(honest.host.get_id()) not in store.get(provider_key(model(4), 0), {}):
                await trio.sleep(0.02)
            assert server.guard.refused["provider_quota"] == 2
