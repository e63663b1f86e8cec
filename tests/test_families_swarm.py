"""Every supported family served by two real peer processes at an uneven split, checked against
transformers' `generate` (greedy, batch 2 with left padding, a prompt longer than the sliding windows).

The default suite runs the four families with the most mechanisms of their own over real peers:
Gemma2 (final logit soft-capping, alternating sliding/global layers, scaled embeddings, eager
attention), Mixtral (MoE blocks converted from per-expert tensors, sliding window), GPT-2 (learned
positions, Conv1D weights) and BLOOM (ALiBi). Every family is checked against transformers in process
by tests/test_families.py in the default suite; over real peers all of them:
`pytest -m slow tests/test_families_swarm.py`.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from molink.swarm import DistributedModelForCausalLM
from molink.swarm.local_swarm import LocalSwarm

from test_families import CASES, prompts, tiny_model_dir

SPANS = [(0, 2), (2, 6)]
NEW_TOKENS = 32
DEFAULT_SUITE = {"gemma2", "mixtral", "gpt2", "bloom"}


@pytest.mark.parametrize("case", [
    pytest.param(case, marks=() if case in DEFAULT_SUITE else pytest.mark.slow) for case in CASES])
def test_two_peer_swarm_matches_transformers(tiny_model_factory, case):
    model_dir = tiny_model_dir(tiny_model_factory, case)
    ids, mask = prompts()
    with LocalSwarm(model_dir, SPANS) as swarm:
        with DistributedModelForCausalLM.from_pretrained(model_dir, swarm.initial_peers) as model:
            got = model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False)
            route = [(hop.start, hop.end) for hop in model.last_route]
        exit_codes = swarm.stop()
    assert route == SPANS
    assert set(exit_codes.values()) == {0}, exit_codes
    reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    expected = reference.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False)
    new = slice(ids.shape[1], None)
    assert torch.equal(got, expected), f"{case}\nswarm:\n{got[:, new]}\ntransformers:\n{expected[:, new]}"
    assert got.shape[1] - ids.shape[1] >= 8 and len(set(got[0, new].tolist())) > 5, "degenerate output"
