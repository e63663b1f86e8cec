"""Micro-batch pipelining (swarm/micro_batches.py, swarm/pipeline_cost.py): one generate call's batch
split into sessions that travel the route one behind the other, merged into exactly what one
batched `generate` returns; how many, by MoLink's rule generalised to a route."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from molink.crypto.identity import Identity
from molink.dht.records import SpanRecord
from molink.swarm.micro_batches import merge_outputs, row_groups
from molink.swarm.model import LocalSpansModelForCausalLM
from molink.swarm.pipeline_cost import (CostCurve, PipelineCosts, Stage, choose_micro_batches, route_costs)
from molink.swarm.routing import DEFAULT_RTT, RouteHop

NEW_TOKENS = 12


def left_padded_batch(batch: int = 8, length: int = 20, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Row r has 2r padding tokens on the left (all rows different)."""
    ids = torch.randint(3, 500, (batch, length), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    for row in range(batch):
        mask[row, :2 * row] = 0
        ids[row, :2 * row] = 0
    return ids, mask


@pytest.fixture(scope="module")
def reference(tiny_llama):
    return AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).train(False)


# ---------------------------------------------------------------------------- pieces


def test_row_groups_and_merge():
    assert row_groups(8, 3) == [slice(0, 3), slice(3, 6), slice(6, 8)]
    assert row_groups(2, 2) == [slice(0, 1), slice(1, 2)]
    merged = merge_outputs([torch.tensor([[1, 2, 3, 4]]), torch.tensor([[5, 6], [7, 8]])], pad=0)
    assert merged.tolist() == [[1, 2, 3, 4], [5, 6, 0, 0], [7, 8, 0, 0]]
    with pytest.raises(ValueError):
        merge_outputs([torch.ones(1, 3), torch.ones(1, 2)], pad=None)


PROPORTIONAL = CostCurve(free_rows=1, rows_per_extra=1)  # b rows cost b x one row
FLAT = CostCurve(free_rows=10**9, rows_per_extra=1)


@pytest.mark.parametrize("per_row_ms,transfer_ms", [(0.01, 2.0), (0.005, 3.0), (0.02, 0.1), (0.002, 0.3),
                                                    (0.01, 30.0), (0.05, 5.0)])
def test_two_nodes_give_molinks_rule(per_row_ms, transfer_ms):
    """MoLink's setting (two nodes, the master doing the head, a transfer each way, compute
    proportional to rows): the smallest k with (k-2) * compute(B/k) >= 2 * transfer(B/k).
    B = 840 splits evenly for every k <= 8."""
    batch = 840
    costs = PipelineCosts([Stage("master", per_row_ms / 1000, PROPORTIONAL),
                           Stage("worker", per_row_ms / 1000, PROPORTIONAL)], [transfer_ms / 1000] * 2)
    molink = next((k for k in range(1, 9) if (k - 2) * per_row_ms * batch / k >= 2 * transfer_ms), 8)
    assert choose_micro_batches(costs, batch, max_k=8, min_rows=1, min_gain=0.0, near_best=0.0) == molink


def test_flat_costs_gain_nothing_from_splitting():
    costs = PipelineCosts([Stage("a", 0.01, FLAT), Stage("b", 0.01, FLAT)], [0.005, 0.005])
    assert choose_micro_batches(costs, 32) == 1


def test_route_costs_from_records():
    a, b = Identity.generate(), Identity.generate()
    a_id, b_id = a.peer_id.to_base58(), b.peer_id.to_base58()

    def hop(identity, start, end, throughput, ip, next_rtts=None) -> RouteHop:
        record = SpanRecord.create(identity, "0" * 40, start, end, [f"/ip4/{ip}/tcp/1"], throughput, 10**6, "t",
                                   next_rtts=next_rtts)
        return RouteHop(record, start, end)

    route = [hop(a, 0, 4, 400.0, "10.0.0.1", {b_id: 0.004}), hop(b, 4, 8, 200.0, "10.0.0.2")]
    costs = route_costs(route, hidden_size=1000, head_seconds=0.001, rtts={a_id: 0.002}, link_rate=4e6)
    busy = {stage.name: stage.busy(1) - stage.fixed for stage in costs.stages}  # per row, without per-step costs
    assert busy["client head"] == 0.001
    assert [round(v, 6) for k, v in busy.items() if "[" in k] == [0.01, 0.02]  # 4 blocks / 400, 4 / 200
    # rtt/2 to A, A's published rtt to B / 2, nothing measured from B: routing's default
    assert costs.delays == [0.001, 0.002, DEFAULT_RTT / 2]
    assert busy["link 0"] == 0.001  # 1000 values x 4 bytes / 4 MB/s
    # a 32-row batch: splitting lets the 20 ms hop compute while the rest of the loop runs
    assert choose_micro_batches(costs, 32) > 1
    # the same peers on the client's own one-core machine: it does every stage, splitting gains nothing
    local = [hop(a, 0, 4, 400.0, "127.0.0.1", {b_id: 0.004}), hop(b, 4, 8, 200.0, "127.0.0.1")]
    local_costs = route_costs(local, hidden_size=1000, head_seconds=0.001, rtts={a_id: 0.002}, link_rate=4e6,
                              client_cores=1)
    assert {stage.host for stage in local_costs.stages if stage.host} == {"client"}
    assert choose_micro_batches(local_costs, 32) == 1


def test_settings_are_checked(tiny_llama):
    model = LocalSpansModelForCausalLM.from_pretrained(tiny_llama, [(0, 3), (3, 6)], progress=False)
    ids, mask = left_padded_batch(4)
    with pytest.raises(ValueError, match="greedy"):
        model.generate(ids, attention_mask=mask, max_new_tokens=2, do_sample=True, micro_batches=2)
    with pytest.raises(ValueError, match="micro_batches"):
        model.generate(ids, attention_mask=mask, max_new_tokens=2, micro_batches=0)


def test_rows_finishing_early_are_padded_like_transformers(tiny_llama, reference):
    """One row per micro-batch, EOS = a token row 0 makes early: that micro-batch stops early and
    its row is padded, as transformers pads it while the others go on."""
    model = LocalSpansModelForCausalLM.from_pretrained(tiny_llama, [(0, 3), (3, 6)], progress=False)
    ids, mask = left_padded_batch(8, seed=3)
    free = reference.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False,
                              eos_token_id=None, pad_token_id=0)
    eos = int(free[0, ids.shape[1] + 2])  # row 0 stops at its third new token
    options = dict(max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=eos, pad_token_id=1)
    expected = reference.generate(ids, attention_mask=mask, **options)
    for k in (8, 3):
        got = model.generate(ids, attention_mask=mask, micro_batches=k, **options)
        assert torch.equal(got, expected), k
    assert (expected[0, ids.shape[1] + 3:] == 1).all()  # padding really happened


# ---------------------------------------------------------------------------- real peer processes


def test_left_padded_batch_in_micro_batches_over_real_peers_is_exact(tiny_llama, reference):
    from molink.swarm import DistributedModelForCausalLM
    from molink.swarm.local_swarm import LocalSwarm

    ids, mask = left_padded_batch(8, seed=1)
    expected = reference.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False)
    with LocalSwarm(tiny_llama, [(0, 2), (2, 4), (4, 6)]) as swarm, \
            DistributedModelForCausalLM.from_pretrained(tiny_llama, swarm.initial_peers) as model:
        opened = []
        open_chain = model.open_chain

        async def counting_open_chain(batch_size, max_length):
            opened.append(batch_size)
            return await open_chain(batch_size, max_length)

        model.open_chain = counting_open_chain
        for k in (2, 3):
            opened.clear()
            got = model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False,
                                 micro_batches=k)
            assert torch.equal(got, expected), k
            assert sorted(opened, reverse=True) == [len(range(8)[g]) for g in row_groups(8, k)]
        model.micro_batches = "auto"
        opened.clear()
        got = model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False)
        assert torch.equal(got, expected)
        assert sum(opened) == 8 and 1 <= len(opened) <= 4
