"""Peers measure and publish RTTs to their next hops (peer/neighbours.py): units, then real processes."""

from __future__ import annotations

import random
import time

import pytest
import trio
from libp2p.kad_dht.kad_dht import DHTMode

from molink.crypto.identity import Identity
from molink.dht.host import running_host
from molink.dht.kademlia import SwarmDHT
from molink.dht.records import MAX_NEXT_RTTS, SpanRecord
from molink.peer.model_key import model_key_for
from molink.peer.neighbours import (
    PROBE_INTERVAL,
    PROBE_INTERVAL_ENV,
    PROBE_TIMEOUT,
    NeighbourProber,
    changed_materially,
    probe_interval_from_env,
    successors,
)
from molink.swarm.local_swarm import LocalSwarm
from molink.swarm.routing import make_route

KEY = "0" * 40


def record(start: int, end: int) -> SpanRecord:
    return SpanRecord.create(Identity.generate(), KEY, start, end, ["/ip4/127.0.0.1/tcp/1"], 100.0, 1000, "t")


class FakeHost:
    def __init__(self, peer_id: str):
        self._id = peer_id

    def get_id(self):
        return self

    def to_base58(self) -> str:
        return self._id


def test_successors_are_the_peers_serving_the_block_after_our_span():
    mine, a, b, before, after = record(0, 4), record(4, 8), record(2, 6), record(0, 3), record(5, 8)
    found = successors([mine, a, b, before, after], mine.peer_id, 4)
    assert {r.peer_id for r in found} == {a.peer_id, b.peer_id}


def test_interval_from_env(monkeypatch):
    monkeypatch.delenv(PROBE_INTERVAL_ENV, raising=False)
    assert probe_interval_from_env() == PROBE_INTERVAL
    monkeypatch.setenv(PROBE_INTERVAL_ENV, "0.5")
    assert probe_interval_from_env() == 0.5
    for bad in ("soon", "-1", "nan"):
        monkeypatch.setenv(PROBE_INTERVAL_ENV, bad)
        with pytest.raises(ValueError):
            probe_interval_from_env()


def test_material_change():
    assert changed_materially({}, {"a": 0.01})
    assert changed_materially({"a": 0.01}, {"b": 0.01})
    assert not changed_materially({"a": 0.010}, {"a": 0.011})  # jitter: no announce
    assert changed_materially({"a": 0.010}, {"a": 0.030})


async def test_probe_smooths_marks_silence_and_bounds_what_it_publishes():
    targets = [record(4, 8) for _ in range(MAX_NEXT_RTTS + 4)]
    answers = {r.peer_id: 0.010 for r in targets}
    silent = targets[0].peer_id
    answers[silent] = None

    prober = NeighbourProber(FakeHost("me"), None, KEY, lambda: (0, 4), 8, rng=random.Random(0))

    async def ping(r):
        return answers[r.peer_id]

    prober.ping = ping
    assert len(prober._choose(targets)) == MAX_NEXT_RTTS  # never more than a record may carry
    prober.rtts = await prober._probe(targets[:2])
    # silence is published as slow (clients then avoid the pair), an answer as measured
    assert prober.rtts == {silent: PROBE_TIMEOUT, targets[1].peer_id: 0.010}
    answers = {peer: 0.020 for peer in answers}
    prober.rtts = await prober._probe(targets[:2])
    assert prober.rtts == {silent: 0.020,  # back from silence: the fresh figure, not a blend with 3 s
                           targets[1].peer_id: pytest.approx(0.7 * 0.010 + 0.3 * 0.020)}  # smoothed
    prober.rtts = await prober._probe(targets[1:2])
    assert set(prober.rtts) == {targets[1].peer_id}  # peers that are no longer next hops drop out
    # more successors than fit: the best measured are kept, a few slots explore the rest
    prober.rtts = {r.peer_id: 0.001 * (i + 1) for i, r in enumerate(targets[:MAX_NEXT_RTTS])}
    chosen = {r.peer_id for r in prober._choose(targets)}
    assert len(chosen) == MAX_NEXT_RTTS and {r.peer_id for r in targets[MAX_NEXT_RTTS:]} <= chosen
    assert {r.peer_id for r in targets[:MAX_NEXT_RTTS - 4]} <= chosen
    published = prober.published()
    assert len(published) <= MAX_NEXT_RTTS and all(0 < v < 60 for v in published.values())


async def _records(initial_peers: list[str], model_key: str) -> list[SpanRecord]:
    identity = Identity.generate()
    async with running_host(identity.keypair, ["/ip4/127.0.0.1/tcp/0"]) as host:
        dht = SwarmDHT(host, identity, mode=DHTMode.CLIENT)
        async with dht.running():
            assert await dht.bootstrap(initial_peers, timeout=10) == 1
            with trio.fail_after(10):
                return await dht.find_spans(model_key)


def test_announced_record_carries_the_rtt_to_the_successor(tiny_llama):
    """Real peer processes with a 1 s probe interval: the first span's record names the second."""
    started = time.monotonic()
    with LocalSwarm(tiny_llama, [(0, 3), (3, 6)], env={PROBE_INTERVAL_ENV: "1"}) as swarm:
        first, second = (peer.address.split("/p2p/")[1] for peer in swarm.peers)
        key = model_key_for(tiny_llama)
        deadline = time.monotonic() + 20
        while True:
            by_peer = {r.peer_id: r for r in trio.run(_records, swarm.initial_peers, key)}
            if second in by_peer.get(first, record(0, 1)).next_rtt_map or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert set(by_peer) == {first, second}
        rtt = by_peer[first].next_rtt_map.get(second)
        assert rtt is not None, f"no RTT to the successor after 20 s: {by_peer[first]}"
        assert 0 < rtt < 1.0  # loopback, a busy 2-core machine included
        assert by_peer[second].next_rtts == ()  # the last span pushes to the client only
        assert by_peer[first].sessions == by_peer[second].sessions == 0
        route = make_route(list(by_peer.values()), 6)
        assert [(h.peer_id, h.start, h.end) for h in route] == [(first, 0, 3), (second, 3, 6)]
    assert time.monotonic() - started < 60
