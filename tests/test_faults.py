"""Fault injection (peer/faults.py, MOLINK_FAULTS on `molink-peer join`): off by default, loud
when on, and it really does what it says — so the tests that rely on it prove something."""

from __future__ import annotations

import signal

import pytest
import torch
import trio
from transformers import AutoModelForCausalLM

from molink.peer.faults import Faults, FaultSpecError
from molink.swarm import DistributedModelForCausalLM
from molink.swarm.local_swarm import LocalSwarm
from tests.test_swarm import peer_infos, prompts


def test_off_unless_asked(monkeypatch):
    monkeypatch.delenv("MOLINK_FAULTS", raising=False)
    assert not Faults.from_env().active


def test_spec_parsing():
    faults = Faults.parse("corrupt=0.05, delay_ms=200,drop=0.01,seed=7")
    assert (faults.corrupt, faults.delay_ms, faults.drop, faults.seed) == (0.05, 200.0, 0.01, 7)
    for bad in ("corrupt=2", "drop=-0.1", "delay_ms=-1", "lie=1", "corrupt=", "corrupt=often"):
        with pytest.raises(FaultSpecError):
            Faults.parse(bad)


def test_corruption_is_plausible_and_seeded():
    out = torch.randn(1, 3, 64)
    a, b = Faults.parse("corrupt=1,seed=3"), Faults.parse("corrupt=1,seed=3")
    bad_a, bad_b = a.maybe_corrupt(out), b.maybe_corrupt(out)
    assert torch.equal(bad_a, bad_b) and not torch.allclose(bad_a, out, atol=1e-2)
    assert bad_a.shape == out.shape and bad_a.dtype == out.dtype and torch.isfinite(bad_a).all()
    assert torch.equal(Faults.parse("corrupt=0").maybe_corrupt(out), out)


def peer_id_of(peer) -> str:
    return peer.address.split("/p2p/")[1]


def test_faulty_peers_over_real_processes(tiny_llama):
    """A lying peer changes the output when nothing verifies (spot checks off); a peer that hangs
    up on every step is routed around and the output stays exact."""
    reference = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).train(False)
    ids, mask = prompts(1, seed=4)
    expected = reference.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False)
    with LocalSwarm(tiny_llama, []) as swarm:  # all four load side by side
        first = swarm.add_peer((0, 3), wait=False)
        liar = swarm.add_peer((3, 6), name="liar", extra_env={"MOLINK_FAULTS": "corrupt=1,seed=1"}, wait=False)
        dropper = swarm.add_peer((3, 6), name="dropper", extra_env={"MOLINK_FAULTS": "drop=1"}, wait=False)
        honest = swarm.add_peer((3, 6), name="honest", wait=False)
        swarm.wait_ready(first, liar, dropper, honest)
        # spot checks off: this shows the fault is real (tests/test_spot_check.py shows them catch it)
        with DistributedModelForCausalLM.from_pretrained(tiny_llama, swarm.initial_peers, spot_check=0) as model:
            for other in (dropper, honest):
                model.bans.avoid(peer_id_of(other), 60.0)  # the route must go through the liar
            lied = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False)
            assert model.last_route[1].peer_id == peer_id_of(liar)
        assert not torch.equal(lied, expected)
        assert "FAULT INJECTION ON" in liar.log_file.read_text()
        swarm.kill(liar, signal.SIGTERM)  # withdraws: the next client does not even try it

        with DistributedModelForCausalLM.from_pretrained(tiny_llama, swarm.initial_peers) as model:
            model.bans.avoid(peer_id_of(honest), 3.0)  # the first route must go through the dropper
            got = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False)
            recoveries = model.last_recoveries
        assert torch.equal(got, expected)
        assert peer_id_of(dropper) in {r["peer_id"] for r in recoveries}, recoveries
        [info] = trio.run(peer_infos, [dropper.address])
        assert info["faults"]["dropped_steps"] >= 1
