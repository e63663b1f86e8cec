"""Spot checks (swarm/spot_check.py): a lying peer is caught by re-running its work elsewhere,
banned, and the generation rolls back and stays exactly what transformers gives."""

from __future__ import annotations

import time

import pytest
import torch
from transformers import AutoModelForCausalLM

from molink.peer import protocol as p
from molink.peer.span import SpanModel
from molink.swarm import DistributedModelForCausalLM
from molink.swarm.local_swarm import LocalSwarm
from molink.swarm.routing import BanList
from molink.swarm.spot_check import Auditor, SpotCheckConfig, TappedStep, mismatched_positions
from tests.test_swarm import peer_id_of, prompts

# ---------------------------------------------------------------------------- pieces


def test_config_is_validated():
    assert SpotCheckConfig.of(None).rate == 0.1 and SpotCheckConfig.of(0.5).rate == 0.5
    for bad in (dict(rate=-0.1), dict(rate=1.5), dict(every=0)):
        with pytest.raises(ValueError):
            SpotCheckConfig(**bad)


def test_tap_flag_in_open_requests():
    body = p.OpenRequest(b"s" * 16, "m", 0, 2, 1, 8, None, tap=True).to_body()
    assert p.OpenRequest.from_body(body, 4).tap is True
    body.pop("tap")
    assert p.OpenRequest.from_body(body, 4).tap is False  # older clients
    with pytest.raises(p.ProtocolError):
        p.OpenRequest.from_body({**body, "tap": "yes"}, 4)


def test_digest_names_values_dtype_and_shape():
    x = torch.randn(1, 3, 8)
    assert p.tensor_digest(x) == p.tensor_digest(x.clone())
    y = x.clone()
    y[0, 1, 2] += 1e-6
    assert p.tensor_digest(y) != p.tensor_digest(x)
    assert p.tensor_digest(x.reshape(1, 8, 3)) != p.tensor_digest(x)
    assert p.tensor_digest(x.to(torch.float16)) != p.tensor_digest(x)


def test_chunked_rerun_agrees_and_corruption_does_not(tiny_llama):
    """The tolerance holds what an honest re-run in one chunk gives, and flags a liar's noise at
    exactly the corrupted positions (padding ignored)."""
    span = SpanModel.load(tiny_llama, 0, 6, dtype=torch.float32)
    ids, mask = prompts(2, length=12)
    hidden = torch.randn(2, 12, span.config.hidden_size)
    stepwise_session = span.new_session(0, 6)
    stepwise = [span.step(stepwise_session, hidden[:, :8], mask[:, :8])]
    for t in range(8, 12):
        stepwise.append(span.step(stepwise_session, hidden[:, t:t + 1], mask[:, t:t + 1]))
    claimed = torch.cat(stepwise, dim=1)
    rerun = span.step(span.new_session(0, 6), hidden, mask)
    assert not mismatched_positions(rerun, claimed, mask).any()
    lied = claimed.clone()
    lied[:, 9] += torch.randn_like(lied[:, 9]) * lied[:, 9].std() * 0.05
    bad = mismatched_positions(rerun, lied, mask)
    assert bad.nonzero().flatten().tolist() == [9]
    steps = [TappedStep(mask[:, :8], [hidden[:, :8]], [lied[:, :8]], [b""])]
    steps += [TappedStep(mask[:, t:t + 1], [hidden[:, t:t + 1]], [lied[:, t:t + 1]], [b""]) for t in range(8, 12)]
    assert Auditor._first_disagreement(rerun, steps, 0, 0, 0, 5) == 2  # the step holding position 9
    assert Auditor._first_disagreement(rerun, steps, 0, 0, 3, 5) is None  # from step 3 on: all fine
    # a last hop that sent only the prompt's last position is held to that position alone
    steps[0].outputs[0] = claimed[:, 7:8]
    steps[2].outputs[0] = claimed[:, 9:10]
    assert Auditor._first_disagreement(rerun, steps, 0, 0, 0, 5) is None
    steps[0].outputs[0] = lied[:, 9:10]  # the wrong position's values, as if it were the last one
    assert Auditor._first_disagreement(rerun, steps, 0, 0, 0, 5) == 0


def test_liars_are_banned_for_long_and_never_forgiven():
    bans = BanList()
    bans.avoid("busy", 5.0)
    bans.ban_liar("liar")
    bans.forgive("liar")
    assert "liar" in bans.banned(now=time.monotonic() + 3000.0) and bans.liars == {"liar"}
    assert bans.struck() == {"liar"}  # a busy peer may still verify others


# ---------------------------------------------------------------------------- the swarm


@pytest.fixture(scope="module")
def swarm(tiny_llama):
    """Blocks [0, 3) on one peer; [3, 6) on two honest peers and two liars (100 % and 5 %)."""
    with LocalSwarm(tiny_llama, [(0, 3), (3, 6), (3, 6)]) as swarm:
        liars = [swarm.add_peer((3, 6), name="liar100", extra_env={"MOLINK_FAULTS": "corrupt=1,seed=1"}, wait=False),
                 # seed 3 corrupts only the 7th step it serves: caught by the audit after step 8
                 swarm.add_peer((3, 6), name="liar5", extra_env={"MOLINK_FAULTS": "corrupt=0.05,seed=3"}, wait=False)]
        swarm.wait_ready(*liars)  # the two load side by side
        yield swarm


@pytest.fixture(scope="module")
def reference(tiny_llama):
    return AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).train(False)


def through(model, swarm, name: str) -> str:
    """Make the first route use peer `name` for blocks [3, 6): the honest others are only
    *avoided* (as if busy), so they may still verify it; the other liars are banned (out of
    routes and audits, so each test sees one liar and its seeded schedule)."""
    chosen = next(peer for peer in swarm.peers if peer.name == name)
    deadline = time.monotonic() + 30  # a fresh DHT may need a moment to list every peer
    while len(model.find_spans()) < len(swarm.peers) and time.monotonic() < deadline:
        time.sleep(0.5)
    for peer in swarm.peers[1:]:
        if peer is chosen:
            continue
        if peer.name.startswith("liar"):
            model.bans.ban_liar(peer_id_of(peer))
        else:
            model.bans.avoid(peer_id_of(peer), 2.0)  # long enough to open the first route
    return peer_id_of(chosen)


@pytest.mark.parametrize("relay", [False, True], ids=["push", "relay"])
def test_a_peer_lying_every_step_is_caught_and_the_output_stays_exact(swarm, reference, tiny_llama, relay):
    ids, mask = prompts(2, seed=5)
    expected = reference.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    # every=8 > 6 steps: the lie is only found by the audit at the end of the generation
    config = SpotCheckConfig(rate=1.0, every=8, seed=0)
    with DistributedModelForCausalLM.from_pretrained(tiny_llama, swarm.initial_peers, spot_check=config,
                                                     relay=relay) as model:
        liar = through(model, swarm, "liar100")
        got = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
        lies, checks = model.last_lies, model.last_spot_checks
        assert liar in model.bans.liars
    assert torch.equal(got, expected)
    assert [(lie["peer_id"], lie["proven"]) for lie in lies] == [(liar, True)], lies
    assert checks["third_opinions"] == 1 and checks["lies_caught"] == 1


def test_a_peer_lying_now_and_then_is_caught_in_sampling_too(swarm, reference, tiny_llama):
    """5 % of its steps: the 7th is wrong. The rollback also restores the sampler's random state,
    so seeded sampling still matches transformers."""
    ids, mask = prompts(1, seed=6)
    sampling = dict(do_sample=True, temperature=0.9, top_k=40)
    torch.manual_seed(11)
    expected = reference.generate(ids, attention_mask=mask, max_new_tokens=24, **sampling)
    with DistributedModelForCausalLM.from_pretrained(tiny_llama, swarm.initial_peers,
                                                     spot_check=SpotCheckConfig(rate=1.0, every=4, seed=0)) as model:
        liar = through(model, swarm, "liar5")
        torch.manual_seed(11)
        got = model.generate(ids, attention_mask=mask, max_new_tokens=24, **sampling)
        lies = model.last_lies
    assert torch.equal(got, expected)
    assert [(lie["peer_id"], lie["step"], lie["proven"]) for lie in lies] == [(liar, 6, True)], lies


def test_honest_swarm_with_long_prompt_has_no_false_alarm(swarm, reference, tiny_llama):
    """A 200-token prompt travels in pipelined chunks; every hop audited, re-runs in one chunk
    agree within tolerance; nobody is accused."""
    ids, mask = prompts(1, length=200, seed=7)
    expected = reference.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False)
    with DistributedModelForCausalLM.from_pretrained(tiny_llama, swarm.initial_peers,
                                                     spot_check=SpotCheckConfig(rate=1.0, every=3, seed=1)) as model:
        honest = through(model, swarm, "peer1")
        got = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False)
        lies, checks = model.last_lies, model.last_spot_checks
        assert honest in {hop.peer_id for hop in model.last_route}
    assert torch.equal(got, expected)
    assert lies == [] and checks["audits"] >= 3 and checks["third_opinions"] == 0


def test_a_liar_serving_concurrent_generations_is_caught_through_stacked_bundles(swarm, reference, tiny_llama):
    """4 generations at once: their decode steps travel bundled, the hidden states stacked in one
    tensor hop to hop (peer/step_bundles.py), audited hops' digests and taps beside them. The
    liar's rows in the stack are still its own: caught, and every output stays exact."""
    from molink.swarm.generation import merged_generation_config
    from tests.concurrent_generations import generate_all_at_once

    batch = [prompts(1, seed=20 + i)[0] for i in range(4)]
    expected = [reference.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False)
                for ids in batch]
    with DistributedModelForCausalLM.from_pretrained(tiny_llama, swarm.initial_peers,
                                                     spot_check=SpotCheckConfig(rate=1.0, every=8, seed=0)) as model:
        liar = through(model, swarm, "liar100")
        config = merged_generation_config(model.generation_config, max_new_tokens=6, do_sample=False)
        got = generate_all_at_once(model, batch, config)
        assert liar in model.bans.liars
        assert model.step_bundles.stats.stacked_results > 0, model.step_bundles.stats
    for out, want in zip(got, expected):
        assert torch.equal(out, want)
