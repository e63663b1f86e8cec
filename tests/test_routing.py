"""Route planning: least expected time, per-pair delays, sub-spans, load spreading and bans.

Speed: scripts/bench_routing.py prints the planning time for 10-400 peers; the guard here only
checks the 100-peer goal (<= 10 ms) with the bench's own swarm.
"""

from __future__ import annotations

import itertools
import random
import statistics
import time

import pytest

from molink.crypto.identity import Identity
from molink.dht.records import SpanRecord
from molink.swarm.routing import DEFAULT_RTT, BanList, NoRouteError, RouteHop, coverage_gaps, make_route

KEY = "0" * 40


def record(start, end, throughput=100.0, relayed=False, identity=None, sessions=0, next_rtts=None):
    identity = identity or Identity.generate()
    relay = Identity.generate().peer_id.to_base58()
    addr = "/ip4/127.0.0.1/tcp/4001" + (f"/p2p/{relay}/p2p-circuit" if relayed else "")
    return SpanRecord.create(identity, KEY, start, end, [addr], throughput, 10_000, "test",
                             sessions=sessions, next_rtts=next_rtts)


def publishing(start, end, rtts: dict, **kw):
    """A record whose peer reports these round trips to the given records' peers."""
    return record(start, end, next_rtts={r.peer_id: rtt for r, rtt in rtts.items()}, **kw)


def peers(route):
    return [h.peer_id for h in route]


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


def test_low_published_rtt_between_hops_wins_when_client_rtts_are_equal():
    b1, b2 = record(5, 10), record(5, 10)
    a1 = publishing(0, 5, {b1: 0.001, b2: 0.300})
    a2 = publishing(0, 5, {b1: 0.300, b2: 0.300})
    client = {r.peer_id: 0.050 for r in (a1, a2, b1, b2)}
    for seed in range(10):
        route = make_route([a2, b2, a1, b1], 10, rtts=client, rng=random.Random(seed))
        assert peers(route) == [a1.peer_id, b1.peer_id]


def test_missing_published_rtts_fall_back_to_the_clients_own_then_the_default():
    b1, b2 = record(5, 10), record(5, 10)
    # a published 1 s to b1 and nothing about b2: b2 costs the client's RTT to it (here: the default)
    a = publishing(0, 5, {b1: 1.0})
    assert peers(make_route([a, b1, b2], 10)) == [a.peer_id, b2.peer_id]
    # nothing published at all: the client's own measurements decide (the old behaviour)
    plain = record(0, 5)
    far = {b1.peer_id: 0.800}
    for seed in range(10):
        assert peers(make_route([plain, b1, b2], 10, rtts=far, rng=random.Random(seed)))[1] == b2.peer_id
    # a published RTT beats the fallback only when it is lower
    assert peers(make_route([publishing(0, 5, {b1: DEFAULT_RTT / 10}), b1, b2], 10))[1] == b1.peer_id


def test_published_rtts_to_peers_that_are_not_next_are_ignored():
    b, stranger = record(5, 10), record(0, 3)
    a = publishing(0, 5, {stranger: 0.001, b: 0.002})  # stale: stranger does not serve block 5
    assert hops(make_route([a, b, stranger], 10)) == [(0, 5), (5, 10)]


def test_relay_mode_charges_the_clients_full_rtt_per_hop():
    b1, b2 = record(5, 10), record(5, 10)
    a = publishing(0, 5, {b1: 0.001, b2: 0.200})
    client = {a.peer_id: 0.01, b1.peer_id: 0.100, b2.peer_id: 0.020}
    # push: a -> b1 (0.5 ms) + b1 -> client (50 ms) beats a -> b2 (100 ms) + b2 -> client (10 ms)
    assert peers(make_route([a, b1, b2], 10, rtts=client)) == [a.peer_id, b1.peer_id]
    # relay: the client carries both hops, so only its own round trips count
    assert peers(make_route([a, b1, b2], 10, rtts=client, relay=True)) == [a.peer_id, b2.peer_id]
    # a whole round trip per hop: relay prefers one slower peer to two hops sooner than push does
    one = record(0, 10, throughput=80)
    pair = publishing(0, 5, {b2: 0.001})
    rtt = {r.peer_id: 0.05 for r in (pair, b2, one)}
    assert len(make_route([pair, b2, one], 10, rtts=rtt)) == 2
    assert len(make_route([pair, b2, one], 10, rtts=rtt, relay=True)) == 1


def test_announced_sessions_spread_load_over_replicas():
    busy, idle = record(0, 6, sessions=4), record(0, 6)
    for seed in range(10):
        assert make_route([busy, idle], 6, rng=random.Random(seed))[0].peer_id == idle.peer_id
    # the client's own sessions add to what the peer announced
    load = {idle.peer_id: 5}
    assert make_route([busy, idle], 6, load=load)[0].peer_id == busy.peer_id


def test_route_enters_a_span_in_the_middle_and_runs_it_to_its_end():
    a, b = record(0, 6), record(1, 10, throughput=1000)
    c = publishing(0, 2, {b: 0.001}, throughput=1000)  # fast and close to b: enter b at block 2
    assert hops(make_route([a, b, c], 10)) == [(0, 2), (2, 10)]
    assert hops(make_route([a, b, c], 10, banned={c.peer_id})) == [(0, 6), (6, 10)]


class _NoJitter(random.Random):
    def random(self):
        return 0.0


def _cost(route, num_blocks, rtts, load, relay):
    """The route's expected time per token, computed independently of the planner."""
    total, prev = 0.0, None
    for hop in route:
        r = hop.record
        client = rtts.get(r.peer_id, DEFAULT_RTT)
        if relay:
            delay = client
        elif prev is not None and r.peer_id in prev.next_rtt_map:
            delay = prev.next_rtt_map[r.peer_id] / 2
        else:
            delay = client / 2
        total += delay + (hop.end - hop.start) * (1 + r.sessions + load.get(r.peer_id, 0)) / r.throughput
        prev = r
    return total + (0.0 if relay else rtts.get(prev.peer_id, DEFAULT_RTT) / 2)


def _all_routes(records, num_blocks):
    def extend(boundary, used):
        if boundary >= num_blocks:
            yield list(used)
            return
        for r in records:
            if r.start <= boundary < r.end:
                used.append(RouteHop(r, boundary, min(r.end, num_blocks)))
                yield from extend(min(r.end, num_blocks), used)
                used.pop()
    yield from extend(0, [])


@pytest.mark.parametrize("seed", range(25))
def test_planner_finds_the_cheapest_route_of_all(seed):
    rng = random.Random(seed)
    num_blocks = 8
    spans = [(0, rng.randint(1, 4))] + [tuple(sorted(rng.sample(range(num_blocks + 1), 2))) for _ in range(6)]
    identities = [Identity.generate() for _ in spans]
    ids = [i.peer_id.to_base58() for i in identities]
    records = []
    for identity, (start, end) in zip(identities, spans):
        nxt = {peer: rng.uniform(0.001, 0.2) for peer, (s, e) in zip(ids, spans)
               if s <= end < e and peer != identity.peer_id.to_base58() and rng.random() < 0.7}
        records.append(SpanRecord.create(identity, KEY, start, end, ["/ip4/127.0.0.1/tcp/1"],
                                         rng.uniform(20, 500), 10_000, "t", sessions=rng.randint(0, 2), next_rtts=nxt))
    rtts = {peer: rng.uniform(0.001, 0.1) for peer in ids if rng.random() < 0.7}
    load = {peer: rng.randint(0, 2) for peer in ids if rng.random() < 0.3}
    options = list(_all_routes(records, num_blocks))
    for relay in (False, True):
        if not options:
            with pytest.raises(NoRouteError):
                make_route(records, num_blocks, rtts=rtts, load=load, relay=relay)
            continue
        route = make_route(records, num_blocks, rtts=rtts, load=load, relay=relay, rng=_NoJitter())
        best = min(_cost(o, num_blocks, rtts, load, relay) for o in options)
        assert _cost(route, num_blocks, rtts, load, relay) == pytest.approx(best)
        assert [h.start for h in route][0] == 0 and route[-1].end == num_blocks
        assert all(x.end == y.start for x, y in itertools.pairwise(route))


def test_planning_100_peers_takes_at_most_10_ms():
    from bench_routing import swarm  # scripts/ is on sys.path (conftest)

    records, rtts = swarm(100, 80, random.Random(0))
    assert sum(len(r.next_rtts) for r in records) > 100  # the per-pair path is exercised
    times = []
    for _ in range(20):
        started = time.perf_counter()
        make_route(records, 80, rtts=rtts, load={})
        times.append(time.perf_counter() - started)
    # the median: a shared CI machine may stall any single run (measured ~0.3 ms; goal 10 ms)
    assert statistics.median(times) <= 0.010
