"""The span-choice and rebalancing rules of peer/block_selection.py, on plain records (no network)."""

from __future__ import annotations

import random
from dataclasses import dataclass, replace

import pytest

from molink.peer.block_selection import (
    block_coverage,
    choose_num_blocks,
    choose_window,
    gaps,
    memory_fit,
    rebalance_decision,
)


@dataclass(frozen=True)
class Rec:
    peer_id: str
    start: int
    end: int
    throughput: float = 10.0


def move(records: list[Rec], peer_id: str, window: tuple[int, int]) -> list[Rec]:
    return [replace(r, start=window[0], end=window[1]) if r.peer_id == peer_id else r for r in records]


def rebalance_round(records: list[Rec], order: list[str], num_blocks: int) -> tuple[list[Rec], list[str]]:
    """Peers decide one after another, each on the state left by the previous one (fresh lookups)."""
    moved = []
    for peer_id in order:
        me = next(r for r in records if r.peer_id == peer_id)
        decision = rebalance_decision(records, me, num_blocks)
        if decision.move:
            records = move(records, peer_id, decision.window)
            moved.append(peer_id)
    return records, moved


# ---------------------------------------------------------------------------- coverage and windows


def test_coverage_sums_throughput_and_ignores_blocks_past_the_model():
    records = [Rec("a", 0, 3, 5.0), Rec("b", 2, 9, 1.5)]
    assert block_coverage(records, 4) == [5.0, 5.0, 6.5, 1.5]
    assert gaps(block_coverage([Rec("a", 1, 2)], 5)) == [(0, 1), (2, 5)]


def test_empty_swarm_takes_the_first_window():
    assert choose_window([], 6, 4, 10.0) == (0, 4)
    assert choose_window([], 6, 99, 10.0) == (0, 6)  # never longer than the model


def test_fills_the_gap():
    assert choose_window([Rec("a", 0, 2)], 6, 2, 10.0) == (2, 4)  # lowest start among the empty windows
    assert choose_window([Rec("a", 0, 2), Rec("b", 2, 4)], 6, 2, 10.0) == (4, 6)
    assert choose_window([Rec("a", 0, 2), Rec("b", 4, 6)], 6, 2, 10.0) == (2, 4)
    # Two gaps no window can close both: cover as many uncovered blocks as possible.
    records = [Rec("a", 1, 2, 1000.0), Rec("b", 4, 5)]
    assert choose_window(records, 6, 2, 10.0) == (2, 4)


def test_takes_the_weakest_window_when_everything_is_covered():
    records = [Rec("a", 0, 6, 10.0), Rec("b", 0, 2, 50.0), Rec("c", 4, 6, 20.0)]
    # coverage [60, 60, 10, 10, 30, 30]: the bottleneck is blocks 2..3
    assert choose_window(records, 6, 2, 10.0) == (2, 4)
    # Three blocks: [2, 5) lifts the bottleneck to 20 (block 3, 4 -> 20, 40), as does [1, 4) (-> 20 at 2, 3)
    # tie -> lowest current coverage sum: [1, 4) = 80, [2, 5) = 50.
    assert choose_window(records, 6, 3, 10.0) == (2, 5)


def test_heterogeneous_throughput_weights_coverage():
    # Block 0..1 are served by one fast peer, 2..3 by two slow ones: 2..3 is weaker despite more peers.
    records = [Rec("fast", 0, 2, 100.0), Rec("slow1", 2, 4, 10.0), Rec("slow2", 2, 4, 10.0)]
    assert choose_window(records, 4, 2, 10.0) == (2, 4)


def test_memory_fit():
    assert memory_fit(1000, 100) == 10
    assert memory_fit(1000, 100, kv_bytes_per_block=25) == 8
    assert memory_fit(1000, 100, fixed_kv_bytes=450) == 5
    assert memory_fit(99, 100) == 0


def test_number_of_blocks_follows_memory_speed_and_gaps():
    # Empty swarm: fill memory (never more than the model).
    assert choose_num_blocks(4, 10.0, [], 6) == 4
    assert choose_num_blocks(9, 10.0, [], 6) == 6
    assert choose_num_blocks(0, 10.0, [], 6) == 0
    covered = [Rec("a", 0, 6, 60.0), Rec("b", 0, 6, 60.0)]  # each span runs at 60/6 = 10 tokens/s
    # Same memory, different speed: the fast peer takes more blocks than the slow one.
    fast, slow = choose_num_blocks(12, 40.0, covered, 6), choose_num_blocks(12, 20.0, covered, 6)
    assert (fast, slow) == (4, 2)
    assert choose_num_blocks(3, 40.0, covered, 6) == 3  # memory still caps a fast peer
    assert choose_num_blocks(12, 1.0, covered, 6) == 1  # a very slow peer still serves one block
    # A gap is worth more than speed: a slow peer closes a 4-block gap if its memory allows.
    gappy = [Rec("a", 0, 2, 20.0)]
    assert choose_num_blocks(9, 10.0, gappy, 6) == 4
    assert choose_num_blocks(2, 10.0, gappy, 6) == 2


# ---------------------------------------------------------------------------- rebalancing


def test_no_move_when_leaving_opens_a_gap():
    # Peer b alone serves 2..4 while 4..6 is empty: moving there would just move the gap.
    records = [Rec("a", 0, 2), Rec("b", 2, 4)]
    decision = rebalance_decision(records, records[1], 6)
    assert not decision.move and "uncover" in decision.reason


def test_moves_to_close_a_gap_when_another_peer_covers_its_blocks():
    records = [Rec("a", 0, 2), Rec("b", 0, 2)]
    decision = rebalance_decision(records, records[0], 4)
    assert decision.move and decision.window == (2, 4)
    assert (decision.current, decision.new) == (0.0, 10.0)


def test_hysteresis_needs_a_gain_over_one_third():
    # coverage [12, 12, 9, 9]: c (2 tokens/s) moving to 2..4 gives [10, 10, 11, 11]: 10 < 9 / 0.75
    records = [Rec("a", 0, 2, 10.0), Rec("b", 2, 4, 9.0), Rec("c", 0, 2, 2.0)]
    decision = rebalance_decision(records, records[2], 4)
    assert not decision.move and decision.window == (2, 4) and "too small" in decision.reason
    # With b at 5: [12, 12, 5, 5] -> [10, 10, 7, 7]: 7 > 5 / 0.75 = 6.67, worth it.
    records[1] = Rec("b", 2, 4, 5.0)
    decision = rebalance_decision(records, records[2], 4)
    assert decision.move and decision.window == (2, 4)


def test_stays_at_its_best_window():
    records = [Rec("a", 0, 2), Rec("b", 2, 4), Rec("c", 0, 4, 5.0)]
    decision = rebalance_decision(records, records[2], 4)
    assert not decision.move


def test_decision_does_not_need_its_own_record_in_the_lookup():
    me = Rec("a", 0, 2)
    with_me = rebalance_decision([me, Rec("b", 0, 2)], me, 4)
    without_me = rebalance_decision([Rec("b", 0, 2)], me, 4)  # our record not (yet) found in the DHT
    assert with_me == without_me


def test_two_identical_peers_on_stale_state_would_flap():
    """Why fresh state matters: deciding on the same snapshot, both move, and the gap moves with them."""
    records = [Rec("a", 0, 2), Rec("b", 0, 2)]
    decisions = [rebalance_decision(records, r, 4) for r in records]
    assert all(d.move and d.window == (2, 4) for d in decisions)
    both_moved = move(move(records, "a", (2, 4)), "b", (2, 4))
    assert gaps(block_coverage(both_moved, 4)) == [(0, 2)]  # ... and next round they would move back


@pytest.mark.parametrize("seed", range(5))
def test_two_identical_peers_deciding_in_sequence_settle_after_one_move(seed):
    """With random timing, one peer decides first and moves; the second re-checks on fresh state and stays."""
    order = ["a", "b"]
    random.Random(seed).shuffle(order)
    records = [Rec("fixed", 4, 6), Rec("a", 0, 2), Rec("b", 0, 2)]  # both on 0..2, nobody on 2..4
    records, moved = rebalance_round(records, order, 6)
    assert moved == [order[0]]
    assert gaps(block_coverage(records, 6)) == []
    for _ in range(5):  # and nobody moves again: no flapping
        records, moved = rebalance_round(records, order, 6)
        assert moved == []


def test_random_swarms_converge_without_flapping():
    """Peers deciding in random order on fresh state stop moving after a few rounds, gaps closed."""
    rng = random.Random(7)
    for _ in range(50):
        num_blocks = rng.randint(4, 12)
        records = []
        for i in range(rng.randint(2, 6)):
            length = rng.randint(1, num_blocks // 2)
            start = rng.randint(0, num_blocks - length)
            records.append(Rec(f"p{i}", start, start + length, rng.choice([5.0, 10.0, 20.0])))
        moves = 0
        for _ in range(20):
            order = [r.peer_id for r in records]
            rng.shuffle(order)
            before = min(block_coverage(records, num_blocks))
            records, moved = rebalance_round(records, order, num_blocks)
            assert min(block_coverage(records, num_blocks)) >= before  # a move never makes it worse
            moves += len(moved)
            if not moved:
                break
        else:
            pytest.fail(f"still moving after 20 rounds: {records}")
        assert moves <= 2 * len(records)


def test_a_sole_server_may_shift_over_a_neighbouring_gap_but_keeps_its_own_blocks():
    # a: 0..2, b: 1..3 (alone on 2), block 3 empty: b may move to 2..4 (keeps 2, covers 3, 1 still has a).
    records = [Rec("a", 0, 2), Rec("b", 1, 3)]
    decision = rebalance_decision(records, records[1], 4)
    assert decision.move and decision.window == (2, 4)
    # a is alone on 0: every window it may take keeps 0, so it stays.
    assert not rebalance_decision(records, records[0], 4).move


# ---------------------------------------------------------------------------- the mechanics of a move


class FakeServer:
    """What the Rebalancer touches of a PeerServer."""

    def __init__(self, span, model_dir):
        from types import SimpleNamespace

        from molink.peer.memory_cache import SessionRegistry

        self.span, self.model_key = span, "key"
        self.handler = SimpleNamespace(span=span, leaving=False)
        self.registry = SessionRegistry(1000)
        self.config = SimpleNamespace(model_dir=model_dir)

    def record(self):
        return Rec("me", self.span.start, self.span.end, 10.0)


class AllAlive:
    """These tests' records name no real peers: take every one for alive."""

    async def live_records(self, records, num_blocks):
        return list(records)


class FakeDHT:
    def __init__(self, *lookups):
        self.lookups, self.announced = list(lookups), []

    async def find_spans(self, model_key):
        return self.lookups.pop(0) if len(self.lookups) > 1 else self.lookups[0]

    async def announce(self, record):
        self.announced.append(record)


async def test_move_switches_new_sessions_announces_and_drops_the_old_span_after_its_last_session(
        tiny_llama, caplog):
    import torch
    import trio

    from molink.peer.memory_cache import ActiveSession
    from molink.peer.rebalancer import Rebalancer
    from molink.peer.span import SpanModel

    old = SpanModel.load(tiny_llama, 0, 2, progress=False)
    server = FakeServer(old, tiny_llama)
    session = ActiveSession(b"s" * 16, old.new_session(), 1, 8, 8, span=old)
    server.registry.add(session)
    # "other" also serves 0..2, "x" serves 4..6 and nobody 2..4: we should move to 2..4.
    dht = FakeDHT([Rec("other", 0, 2), Rec("x", 4, 6)])
    caplog.set_level("INFO", logger="molink.peer.rebalancer")
    async with trio.open_nursery() as nursery:
        rebalancer = Rebalancer(server, dht, interval=3600, liveness=AllAlive())
        await nursery.start(rebalancer.run)
        assert await rebalancer.check_once()
        assert (server.span.start, server.span.end) == (2, 4) and server.handler.span is server.span
        assert [(r.start, r.end) for r in dht.announced] == [(2, 4)]  # announced at once
        assert session.span is old  # the open session finishes where it started
        await trio.sleep(0.6)
        assert "dropped" not in caplog.text
        server.registry.remove(session.session_id)
        await trio.sleep(0.6)
        assert "old span [0, 2) dropped" in caplog.text
        nursery.cancel_scope.cancel()
    # The moved span computes like a freshly loaded one.
    fresh = SpanModel.load(tiny_llama, 2, 4, progress=False)
    hidden, mask = torch.randn(1, 3, old.config.hidden_size), torch.ones(1, 3, dtype=torch.long)
    assert torch.equal(server.span.step(server.span.new_session(), hidden, mask),
                       fresh.step(fresh.new_session(), hidden, mask))


async def test_move_is_abandoned_when_the_recheck_sees_another_peer_took_the_window(tiny_llama):
    import trio

    from molink.peer.rebalancer import Rebalancer
    from molink.peer.span import SpanModel

    old = SpanModel.load(tiny_llama, 0, 2, progress=False)
    server = FakeServer(old, tiny_llama)
    # First look: 2..4 is empty. While we load, "rival" takes it; the re-check sees that.
    dht = FakeDHT([Rec("other", 0, 2), Rec("x", 4, 6)], [Rec("other", 0, 2), Rec("x", 4, 6), Rec("rival", 2, 4)])
    async with trio.open_nursery() as nursery:
        rebalancer = Rebalancer(server, dht, interval=3600, liveness=AllAlive())
        await nursery.start(rebalancer.run)
        assert not await rebalancer.check_once()
        nursery.cancel_scope.cancel()
    assert server.span is old and dht.announced == []


def test_moved_span_reuses_the_blocks_it_shares(tiny_llama):
    from molink.peer.rebalancer import load_moved_span
    from molink.peer.span import SpanModel

    old = SpanModel.load(tiny_llama, 1, 4, progress=False)
    for start, end in [(0, 2), (2, 5), (0, 6), (4, 6)]:
        new = load_moved_span(old, tiny_llama, start, end)
        assert (new.start, new.end, len(new.blocks)) == (start, end, end - start)
        for index in range(max(start, 1), min(end, 4)):
            assert new.blocks[index - start] is old.blocks[index - 1]
