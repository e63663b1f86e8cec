"""Churn: peers killed, frozen, leaving or restarting mid-generation; output stays identical."""

from __future__ import annotations

import random
import signal
import threading

import pytest
import torch
from transformers import AutoModelForCausalLM

from molink.swarm import DistributedModelForCausalLM
from molink.swarm.local_swarm import LocalSwarm

NEW_TOKENS = 24
SPANS = [(0, 3), (3, 6)]


def prompt():
    ids = torch.randint(3, 500, (2, 12), generator=torch.Generator().manual_seed(7))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    return ids, mask


class ActAtToken:
    """A streamer that runs `action` once, when the n-th new token arrives."""

    def __init__(self, n: int, action):
        self.n, self.action, self.seen = n, action, -1

    def put(self, value) -> None:
        self.seen += 1
        if self.seen == self.n:
            self.action()

    def end(self) -> None:
        pass


def peer_on_route(swarm: LocalSwarm, model, hop: int):
    peer_id = model.last_route[hop].peer_id
    for peer in swarm.peers:
        address = peer.address or (peer.ready_file.read_text().strip() if peer.ready_file.exists() else "")
        if address.endswith(peer_id) and peer.process.poll() is None:
            return peer
    raise LookupError(f"no live local peer {peer_id}")


@pytest.fixture(scope="module")
def reference(tiny_llama):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    ids, mask = prompt()
    return model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False)


@pytest.fixture(scope="module")
def replicated(tiny_llama):
    """Two replicas of each span."""
    with LocalSwarm(tiny_llama, SPANS * 2) as swarm:
        with DistributedModelForCausalLM.from_pretrained(tiny_llama, swarm.initial_peers) as model:
            yield swarm, model


def run_with_failure(swarm, model, position: int, hop: int, sig: int):
    victims = []

    def act():
        victim = peer_on_route(swarm, model, hop)
        victims.append(victim)
        victim.process.send_signal(sig)

    ids, mask = prompt()
    out = model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False,
                         streamer=ActAtToken(position, act))
    return out, victims[0]


def assert_no_dead_record_was_tried(model):
    """Earlier cases' victims still have records in the DHT (until they expire): a re-route dials
    a planned route's new peers first and routes around those that refuse, so every failure a
    recovery meets is this case's victim's, never a failed open on an earlier victim's record.
    (The victim may fail twice: when it was its span's last replica, the recovery waits for a
    joining peer and may outlast the victim's ban.)"""
    for recovery in model.last_recoveries:
        victim_id = recovery["peer_id"]  # who failed first
        assert all(victim_id in error for error in recovery["errors"]), recovery["errors"]


def kill_cases(count: int, seed: int):
    rng = random.Random(seed)
    return [(rng.randrange(1, NEW_TOKENS), rng.randrange(len(SPANS))) for _ in range(count)]


def _kill_and_replace(replicated, reference, position, hop):
    swarm, model = replicated
    out, victim = run_with_failure(swarm, model, position, hop, signal.SIGKILL)
    assert torch.equal(out, reference)
    assert model.last_recoveries, "the victim was on the route, a recovery must have happened"
    assert_no_dead_record_was_tried(model)
    victim.process.wait(10)
    # A replacement starts in the background: until it is ready, a case that kills the last
    # replica of that span also shows a joining peer filling the gap.
    swarm.add_peer(victim.blocks, wait=False)


@pytest.mark.parametrize("position, hop", kill_cases(10, seed=1))
def test_kill_9_at_random_token_is_survived_with_identical_tokens(replicated, reference, position, hop):
    _kill_and_replace(replicated, reference, position, hop)


@pytest.mark.slow
@pytest.mark.parametrize("position, hop", kill_cases(50, seed=2))
def test_kill_9_soak_50_cases(replicated, reference, position, hop):
    _kill_and_replace(replicated, reference, position, hop)


def test_frozen_peer_is_detected_by_heartbeat_and_routed_around(replicated, reference):
    swarm, model = replicated
    # the kill cases' replacements first: this case is about the heartbeat, not about waiting for
    # a joining peer when the frozen one was its span's last live replica
    swarm.wait_ready(*(peer for peer in swarm.peers if peer.process.poll() is None))
    out, victim = run_with_failure(swarm, model, 5, 1, signal.SIGSTOP)
    try:
        assert torch.equal(out, reference)
        reasons = [r["error"] for r in model.last_recoveries]
        assert any("nothing from the peer" in r for r in reasons), reasons  # heartbeat, not a step deadline
        assert_no_dead_record_was_tried(model)  # (the kill cases before left dead records)
    finally:
        swarm.kill(victim, signal.SIGKILL)
        swarm.add_peer(victim.blocks)


def test_graceful_leave_mid_generation(replicated, reference):
    swarm, model = replicated
    out, victim = run_with_failure(swarm, model, 8, 0, signal.SIGTERM)
    assert torch.equal(out, reference)
    assert victim.process.wait(20) == 0
    swarm.add_peer(victim.blocks)


def test_a_peer_joining_fills_the_gap_of_the_only_replica(tiny_llama, reference):
    with LocalSwarm(tiny_llama, SPANS) as swarm:
        with DistributedModelForCausalLM.from_pretrained(tiny_llama, swarm.initial_peers) as model:
            ids, mask = prompt()
            model.generate(ids, attention_mask=mask, max_new_tokens=2)  # learn the route

            def kill_and_join_later():
                victim = peer_on_route(swarm, model, 1)
                swarm.kill(victim, signal.SIGKILL)
                threading.Thread(target=swarm.add_peer, args=(victim.blocks,), daemon=True).start()

            out = model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False,
                                 streamer=ActAtToken(6, kill_and_join_later))
            assert torch.equal(out, reference)


def test_restart_with_same_identity_on_new_port_is_used_at_once(tiny_llama, reference, tmp_path):
    key = str(tmp_path / "peer.key")
    with LocalSwarm(tiny_llama, []) as swarm:  # the two peers load side by side
        first = swarm.add_peer((0, 3), wait=False)
        restartable = swarm.add_peer((3, 6), extra_args=["--identity", key], wait=False)
        swarm.wait_ready(first, restartable)
        with DistributedModelForCausalLM.from_pretrained(tiny_llama, swarm.initial_peers) as model:
            ids, mask = prompt()
            model.generate(ids, attention_mask=mask, max_new_tokens=2)
            assert model.last_route[1].peer_id == restartable.address.rsplit("/", 1)[1]
            swarm.kill(restartable, signal.SIGKILL)
            again = swarm.add_peer((3, 6), extra_args=["--identity", key])
            assert again.address != restartable.address  # a new port, the same peer id
            assert again.address.rsplit("/", 1)[1] == restartable.address.rsplit("/", 1)[1]
            out = model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False)
            assert torch.equal(out, reference)
            assert model.bans.banned() == set(), "the restarted peer must not be banned"
