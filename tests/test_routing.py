"""Route planning: least expected time, sub-spans, load spreading and bans (speed: scripts/bench_routing.py)."""

from __future__ import annotations

import random

import pytest

from molink.crypto.identity import Identity
from molink.dht.records import SpanRecord
from molink.swarm.routing import BanList, NoRouteError, coverage_gaps, make_route

KEY = "0" * 40


def record(start, end, throughput=100.0, relayed=False, identity=None):
    identity = identity or Identity.generate()
    relay = Identity.generate().peer_id.to_base58()
    addr = "/ip4/127.0.0.1/tcp/4001" + (f"/p2p/{relay}/p2p-circuit" if relayed else "")
    return SpanRecord.create(identity, KEY, start, end, [addr], throughput, 10_000, "test")


def hops(route):
    return [(h.start, h.end) for h in route]


def test_route_covers_all_blocks_using_sub_spans():
    route = make_route([record(0, 10), record(8, 30)], 30, rng=random.Random(0))
    assert hops(route) == [(0, 10), (10, 30)]


def test_faster_replica_wins_and_measured_rtt_counts():
    slow, fast = record(0, 10, throughput=50), record(0, 10, throughput=5000)
    assert make_route([slow, fast], 10)[0].peer_id == fast.peer_id
    far = {fast.peer_id: 1.0}  # a 1 s round trip outweighs the compute it saves
    assert make_route([slow, fast], 10, rtts=far)[0].peer_id == slow.peer_id


def test_relayed_peer_is_penalised():
    direct, relayed = record(0, 10), record(0, 10, relayed=True)
    for seed in range(10):
        assert make_route([relayed, direct], 10, rng=random.Random(seed))[0].peer_id == direct.peer_id


def test_fewer_hops_beat_many_when_compute_is_equal():
    one = record(0, 12)
    pieces = [record(0, 4), record(4, 8), record(8, 12)]
    assert hops(make_route([*pieces, one], 12)) == [(0, 12)]


def test_sessions_spread_over_replicas_with_load():
    a, b = record(0, 6), record(0, 6)
    load: dict[str, int] = {}
    chosen = []
    for _ in range(6):
        peer = make_route([a, b], 6, load=load)[0].peer_id
        load[peer] = load.get(peer, 0) + 1
        chosen.append(peer)
    assert chosen.count(a.peer_id) == 3 and chosen.count(b.peer_id) == 3


def test_banned_peers_are_avoided_and_gaps_are_named():
    a, b = record(0, 6), record(0, 6)
    assert make_route([a, b], 6, banned={a.peer_id})[0].peer_id == b.peer_id
    with pytest.raises(NoRouteError, match=r"\(3, 6\)"):
        make_route([record(0, 3)], 6)
    assert coverage_gaps([record(0, 2), record(4, 5)], 6) == [(2, 4), (5, 6)]


def test_ban_duration_doubles_and_forgiveness_resets():
    bans = BanList(base=1.0, cap=8.0)
    assert [bans.ban("p", now=0) for _ in range(5)] == [1.0, 2.0, 4.0, 8.0, 8.0]
    assert bans.banned(now=7.0) == {"p"} and bans.banned(now=9.0) == set()
    bans.forgive("p")
    assert bans.ban("p", now=0) == 1.0
