"""Span records through REAL libp2p hosts and KadDHT on 127.0.0.1, all in one trio process.

Topology per test: one bootstrap server, three serving peers (DHT servers), one client node in
DHT client mode, and where needed a malicious DHT server whose own validator accepts anything,
so its forged/expired PUT_VALUEs really reach the honest nodes' validators.
"""

from __future__ import annotations

import socket
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from dataclasses import dataclass, field, replace

import msgpack
import trio
from libp2p.kad_dht.kad_dht import DHTMode
from libp2p.kad_dht.utils import sort_peer_ids_by_distance
from libp2p.peer.peerinfo import PeerInfo
from multiaddr import Multiaddr
from libp2p.records.validator import BlankValidator

from molink.crypto.identity import Identity
from molink.crypto.signing import sign_record
from molink.dht.host import running_host
from molink.dht.kademlia import (
    NAMESPACE,
    PROVIDER_QUERY_PEERS,
    SpanRecordValidator,
    SwarmDHT,
    provider_key,
    provider_shard,
    value_key,
)
from molink.dht.model_keys import model_dht_key
from molink.dht.records import (
    ANNOUNCE_KIND,
    BadSignature,
    ForgedRecord,
    RecordError,
    RecordExpired,
    SpanRecord,
    encode_envelope,
)

MODEL = model_dht_key("tiny-llama", {"num_hidden_layers": 12}, "ab" * 32)
OTHER_MODEL = model_dht_key("tiny-llama", {"num_hidden_layers": 12}, "cd" * 32)
TEST_DEADLINE = 20.0  # a hang guard only: each test takes 2-3 s here, ~3 s with 3 suites at once


@dataclass
class Node:
    identity: Identity
    dht: SwarmDHT
    stop: trio.Event = field(default_factory=trio.Event)
    closed: trio.Event = field(default_factory=trio.Event)

    @property
    def peer_id(self) -> str:
        return self.identity.peer_id.to_base58()

    @property
    def addrs(self) -> list[str]:
        return [str(a) for a in self.dht.host.get_addrs()]

    def record(self, start: int, end: int, model: str = MODEL, **kw) -> SpanRecord:
        return SpanRecord.create(self.identity, model, start, end, self.addrs, 50.0, 2048,
                                 "0.1.0", **kw)

    async def kill(self) -> None:
        """Close the host (no withdrawal) and wait until it is gone."""
        self.stop.set()
        await self.closed.wait()


class Swarm:
    """Each node lives in its own task, so all of them close concurrently at the end
    (closing one host takes ~0.1-0.4 s; one after another that was half of each test)."""

    def __init__(self, nursery: trio.Nursery) -> None:
        self.nursery = nursery
        self.nodes: list[Node] = []

    async def add(self, bootstrap: list[str], mode: DHTMode = DHTMode.SERVER) -> Node:
        node = await self.nursery.start(self._run, bootstrap, mode)
        self.nodes.append(node)
        return node

    async def _run(self, bootstrap: list[str], mode: DHTMode,
                   task_status: trio.TaskStatus[Node]) -> None:
        identity = Identity.generate()
        try:
            async with running_host(identity.keypair) as host, \
                    SwarmDHT(host, identity, mode=mode).running() as dht:
                if bootstrap:
                    assert await dht.bootstrap(bootstrap) == len(bootstrap)
                node = Node(identity, dht)
                task_status.started(node)
                await node.stop.wait()
        finally:
            if "node" in locals():
                node.closed.set()


def _task_count() -> int:
    def walk(task: trio.lowlevel.Task) -> int:
        return 1 + sum(walk(t) for n in task.child_nurseries for t in n.child_tasks)
    return walk(trio.lowlevel.current_root_task())


@asynccontextmanager
async def swarm(peers: int = 3) -> AsyncIterator[tuple[Node, list[Node], Node, Swarm]]:
    """(bootstrap, serving peers, client, the Swarm to add nodes to); checks for leaked tasks."""
    before = _task_count()
    async with trio.open_nursery() as nursery:
        nodes = Swarm(nursery)
        try:
            boot = await nodes.add([])
            servers = [await nodes.add(boot.addrs) for _ in range(peers)]
            client = await nodes.add(boot.addrs, DHTMode.CLIENT)
            assert _task_count() > before + 10  # the walk does see the hosts' tasks
            yield boot, servers, client, nodes
        finally:
            for node in nodes.nodes:
                node.stop.set()
    await trio.sleep(0.05)  # let cancelled system tasks (identify) unwind
    assert _task_count() <= before, "tasks left running after every host closed"


class RecordingValidator(SpanRecordValidator):
    """The real validator, remembering what it refused (to prove refusals happen on store)."""

    def __init__(self) -> None:
        self.refused: list[type[Exception]] = []

    def validate(self, key: str, value: bytes) -> None:
        try:
            super().validate(key, value)
        except RecordError as exc:
            self.refused.append(type(exc))
            raise


def spans_by_peer(records: list[SpanRecord]) -> dict[str, tuple[int, int]]:
    return {r.peer_id: (r.start, r.end) for r in records}


async def test_client_finds_every_announced_peer() -> None:
    with trio.fail_after(TEST_DEADLINE):
        async with swarm() as (_boot, peers, client, _):
            for i, peer in enumerate(peers):
                await peer.dht.announce(peer.record(4 * i, 4 * i + 4))
            expected = {p.peer_id: (4 * i, 4 * i + 4) for i, p in enumerate(peers)}
            found = await client.dht.find_spans(MODEL)
            assert spans_by_peer(found) == expected
            assert all(r.addrs == tuple(p.addrs) for r, p in
                       zip(sorted(found, key=lambda r: r.start), peers))
            # A providing peer must still see the others, not only its local provider entry.
            assert spans_by_peer(await peers[0].dht.find_spans(MODEL)) == expected
            # Another model's key space is empty: different weights never mix.
            assert await client.dht.find_spans(OTHER_MODEL) == []


async def test_forged_and_expired_records_are_refused() -> None:
    with trio.fail_after(TEST_DEADLINE):
        async with swarm() as (boot, peers, client, nodes):
            honest = [boot, *peers]
            recorders = [RecordingValidator() for _ in honest]
            for node, recorder in zip(honest, recorders):
                node.dht.dht.register_validator(NAMESPACE, recorder)
            victim = peers[0]
            replayable = victim.record(0, 2).sign(victim.identity)  # genuine, unexpired, soon outdated
            for i, peer in enumerate(peers):
                await peer.dht.announce(peer.record(4 * i, 4 * i + 4))
            evil = await nodes.add(boot.addrs)
            # Mallory's own node accepts anything, so her puts really go out on the wire.
            evil.dht.dht.register_validator(NAMESPACE, BlankValidator())

            # 1. Hijack: victim's id and key, Mallory's addresses, a higher seq, her signature.
            hijack = replace(victim.record(0, 12), addrs=tuple(evil.addrs)).to_dict()
            await evil.dht.dht.put_value(value_key(MODEL, victim.peer_id), encode_envelope(
                hijack, sign_record(evil.identity, ANNOUNCE_KIND, hijack)))
            # 2. Forged ownership: victim's id with Mallory's key, validly signed by her.
            forged = replace(victim.record(0, 12), public_key=evil.identity.public_key).to_dict()
            await evil.dht.dht.put_value(value_key(MODEL, peers[1].peer_id), encode_envelope(
                forged, sign_record(evil.identity, ANNOUNCE_KIND, forged)))
            # 3. Her own record, correctly signed but expired, plus a provider entry for it.
            stale = replace(evil.record(0, 12), expires_at=time.time() - 5)
            await evil.dht.dht.put_value(value_key(MODEL, evil.peer_id), stale.sign(evil.identity))
            await evil.dht.dht.provider_store.provide(provider_key(MODEL,
                                                                   provider_shard(evil.peer_id)))

            # 4. Replay: the victim's own older record (valid signature, lower seq) put again;
            #    libp2p's store keeps the higher seq (our validator's `select`).
            await evil.dht.dht.put_value(value_key(MODEL, victim.peer_id), replayable)

            # Refused on store, each for its own reason, by the honest nodes it reached ...
            refused = {t for r in recorders for t in r.refused}
            assert {BadSignature, ForgedRecord, RecordExpired} <= refused, refused
            # ... which hold only the genuine records.
            for node in honest:
                store = node.dht.dht.value_store
                assert store.get(value_key(MODEL, evil.peer_id).encode()) is None
                held = store.get(value_key(MODEL, victim.peer_id).encode())
                if held is not None:
                    held_record = SpanRecord.from_dict(msgpack.unpackb(held.value)["record"])
                    assert held_record.addrs == tuple(victim.addrs)
                    assert (held_record.start, held_record.end) == (0, 4)  # the replay lost to the newer seq
            # Not returned by lookups, even though Mallory serves them from her own store.
            found = {r.peer_id: r for r in await client.dht.find_spans(MODEL)}
            assert set(found) == {p.peer_id for p in peers}
            assert found[victim.peer_id].addrs == tuple(victim.addrs)
            assert (found[victim.peer_id].start, found[victim.peer_id].end) == (0, 4)


async def test_withdraw_and_reannounce() -> None:
    with trio.fail_after(TEST_DEADLINE):
        async with swarm() as (_boot, peers, client, _):
            for i, peer in enumerate(peers):
                await peer.dht.announce(peer.record(4 * i, 4 * i + 4))
            assert len(await client.dht.find_spans(MODEL)) == 3  # the client has looked once

            await peers[1].dht.withdraw(MODEL)
            found = spans_by_peer(await client.dht.find_spans(MODEL))
            assert set(found) == {peers[0].peer_id, peers[2].peer_id}
            assert peers[1].peer_id not in spans_by_peer(await peers[1].dht.find_spans(MODEL))

            # Re-announce with a higher seq replaces the record everywhere (no stale cache).
            await peers[0].dht.announce(peers[0].record(6, 12))
            await peers[1].dht.announce(peers[1].record(0, 6))
            found = spans_by_peer(await client.dht.find_spans(MODEL))
            assert found == {peers[0].peer_id: (6, 12), peers[1].peer_id: (0, 6),
                             peers[2].peer_id: (8, 12)}


async def test_run_announcer_refreshes_and_withdraws_on_exit() -> None:
    with trio.fail_after(TEST_DEADLINE):
        async with swarm(peers=2) as (_boot, peers, client, _):
            state = {"span": (0, 6)}

            def current() -> SpanRecord | None:
                return peers[0].record(*state["span"]) if state["span"] else None

            async with trio.open_nursery() as nursery:
                # started() comes after the first announce: findable right away
                await nursery.start(lambda task_status: peers[0].dht.run_announcer(
                    current, 0.3, ttl=5.0, withdraw_on_exit=True, task_status=task_status))
                assert spans_by_peer(await client.dht.find_spans(MODEL)) == {
                    peers[0].peer_id: (0, 6)}
                state["span"] = (2, 8)
                await trio.sleep(0.6)
                assert spans_by_peer(await client.dht.find_spans(MODEL)) == {
                    peers[0].peer_id: (2, 8)}
                state["span"] = None  # "serving nothing now" withdraws ...
                await trio.sleep(0.6)
                assert await client.dht.find_spans(MODEL) == []
                state["span"] = (1, 3)  # ... and serving again re-announces
                await trio.sleep(0.6)
                assert spans_by_peer(await client.dht.find_spans(MODEL)) == {
                    peers[0].peer_id: (1, 3)}
                nursery.cancel_scope.cancel()
            assert await client.dht.find_spans(MODEL) == []


async def test_peer_in_dht_client_mode_is_found_through_replicas() -> None:
    # A peer behind NAT runs the DHT in client mode: nobody can ask it for its own record, so
    # lookups fall back to the replicas, where a hijacked copy must lose as well.
    with trio.fail_after(TEST_DEADLINE):
        async with swarm(peers=2) as (boot, _peers, client, nodes):
            natted = await nodes.add(boot.addrs, DHTMode.CLIENT)
            await natted.dht.announce(natted.record(0, 12))
            evil = await nodes.add(boot.addrs)
            evil.dht.dht.register_validator(NAMESPACE, BlankValidator())
            hijack = replace(natted.record(0, 12), addrs=tuple(evil.addrs)).to_dict()
            await evil.dht.dht.put_value(value_key(MODEL, natted.peer_id), encode_envelope(
                hijack, sign_record(evil.identity, ANNOUNCE_KIND, hijack)))
            for node in (client, evil):
                found = await node.dht.find_spans(MODEL)
                assert [(r.peer_id, r.addrs) for r in found] == [
                    (natted.peer_id, tuple(natted.addrs))]
            await natted.dht.withdraw(MODEL)
            assert await client.dht.find_spans(MODEL) == []


async def test_dead_peer_is_listed_from_replicas_until_its_record_expires() -> None:
    with trio.fail_after(TEST_DEADLINE):
        async with swarm(peers=2) as (boot, _peers, client, nodes):
            dead = await nodes.add(boot.addrs)
            # long enough for the kill and a lookup on a loaded 2-core box (1.5 s was not)
            await dead.dht.announce(dead.record(0, 12, ttl=4.0))
            expires_at = time.time() + 4.0
            await dead.kill()
            # Its host is gone (killed without a withdrawal): the direct ask fails fast and
            # the replicas still vouch for it, until its own expiry says otherwise.
            assert [r.peer_id for r in await client.dht.find_spans(MODEL)] == [dead.peer_id]
            await trio.sleep(max(0.0, expires_at - time.time()) + 0.1)
            assert await client.dht.find_spans(MODEL) == []


def _closed_port() -> int:
    with socket.socket() as sock:  # bound, never listened on, closed: a dial there is refused
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def test_announce_reaches_the_live_peers_closest_to_its_key_when_dead_ones_are_closer() -> None:
    """libp2p's provide() sends ADD_PROVIDER to the 20 closest peers it has heard of, dead or
    alive. After churn, dead peers closer to a shard key than any live one must not swallow a
    joining peer's provider record: the live peers closest to the key (those clients ask) get it."""
    with trio.fail_after(TEST_DEADLINE * 2):
        async with swarm(peers=5) as (boot, peers, client, nodes):
            newcomer = await nodes.add(boot.addrs)
            key = provider_key(MODEL, provider_shard(newcomer.peer_id))
            live = [boot, *peers]
            live_ids = [node.identity.peer_id for node in live]
            routing_table = newcomer.dht.dht.routing_table
            dead = Multiaddr(f"/ip4/127.0.0.1/tcp/{_closed_port()}")
            injected = 0
            while injected < 30:  # dead peers, each closer to the key than every live peer
                ghost = Identity.generate().peer_id
                if sort_peer_ids_by_distance(key, [*live_ids, ghost])[0] != ghost:
                    continue
                newcomer.dht.host.get_peerstore().add_addrs(ghost, [dead], 3600)
                injected += await routing_table.add_peer(PeerInfo(ghost, [dead]), skip_server_mode_check=True)
            assert len(routing_table.find_local_closest_peers(key, 40)) >= 20
            await newcomer.dht.announce(newcomer.record(0, 12))
            nearest = [node for node in sorted(live, key=lambda n: sort_peer_ids_by_distance(key, live_ids).index(
                n.identity.peer_id))][:PROVIDER_QUERY_PEERS]
            for node in nearest:  # ADD_PROVIDER is fire-and-forget: give the receivers a moment
                with trio.move_on_after(5):
                    while newcomer.identity.peer_id not in {
                            info.peer_id for info in node.dht.dht.provider_store.get_providers(key)}:
                        await trio.sleep(0.05)
                holders = {info.peer_id for info in node.dht.dht.provider_store.get_providers(key)}
                assert newcomer.identity.peer_id in holders, f"{node.peer_id} does not list the newcomer"
            assert newcomer.peer_id in spans_by_peer(await client.dht.find_spans(MODEL))


async def test_a_frozen_contact_costs_one_rpc_timeout_not_one_per_lookup() -> None:
    """A frozen peer accepts TCP and never answers: each RPC to it waits out RPC_TIMEOUT. A node
    leaves such a contact out of its lookups for SILENT_FOR seconds after the first timeout, so
    the next lookups neither dial it nor wait for it (and still find every live peer)."""
    accepted = 0

    async def hold(stream: trio.SocketStream) -> None:
        nonlocal accepted
        accepted += 1
        await trio.sleep_forever()  # never a byte back: the handshake hangs

    with trio.fail_after(TEST_DEADLINE * 2):
        async with swarm() as (_boot, peers, client, _), trio.open_nursery() as tarpit:
            [listener] = await tarpit.start(partial(trio.serve_tcp, hold, 0, host="127.0.0.1"))
            frozen = Multiaddr(f"/ip4/127.0.0.1/tcp/{listener.socket.getsockname()[1]}")
            for i, peer in enumerate(peers):
                await peer.dht.announce(peer.record(4 * i, 4 * i + 4))
            expected = {p.peer_id: (4 * i, 4 * i + 4) for i, p in enumerate(peers)}
            ghost = Identity.generate().peer_id
            client.dht.host.get_peerstore().add_addrs(ghost, [frozen], 3600)
            assert await client.dht.dht.routing_table.add_peer(PeerInfo(ghost, [frozen]),
                                                               skip_server_mode_check=True)
            assert spans_by_peer(await client.dht.find_spans(MODEL)) == expected
            assert accepted >= 1, "the first lookup dialled the frozen contact"
            before = accepted
            for _ in range(2):
                assert spans_by_peer(await client.dht.find_spans(MODEL)) == expected
            assert accepted == before, "later lookups must leave the frozen contact out"
            tarpit.cancel_scope.cancel()
