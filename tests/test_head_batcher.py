"""The client head shared by concurrent generations (swarm/head_batcher.py): one lm_head forward for
every generation waiting on one, per-row results as a lone forward gives them, a lone generation
never waits or hops threads, and over real peers concurrent generations stay transformers' tokens
(greedy, and seeded sampling with a generator per generation)."""

from __future__ import annotations

import time

import pytest
import torch
import trio
from transformers import AutoModelForCausalLM

from molink.swarm.client_head import load_client_head
from molink.swarm.head_batcher import HeadBatcher
from tests.concurrent_generations import generate_all_at_once

LOGITS_ATOL = 1e-5  # batched vs lone lm_head: float rounding of the matmul (observed ~2e-6)


@pytest.fixture(scope="module")
def head(tiny_llama):
    return load_client_head(tiny_llama)


class SlowHead:
    """A head whose forward takes a while (so requests pile up behind it), counting its calls."""

    def __init__(self, head, seconds: float = 0.05):
        self.head, self.seconds, self.calls = head, seconds, []

    def batcher(self) -> HeadBatcher:
        """A batcher over this head, its one-time cost probe done and not counted."""
        batcher = HeadBatcher(self)
        batcher.step_seconds(1, 64, torch.float32)
        self.calls.clear()
        return batcher

    needs_positions = False

    def logits(self, hidden):
        self.calls.append(hidden.shape[0])
        time.sleep(self.seconds)
        return self.head.logits(hidden)


async def test_concurrent_requests_share_one_forward_and_get_their_own_rows(head):
    batcher = HeadBatcher(head, min_batch_seconds=0.0)  # share even this tiny head
    rows = [1, 2, 1, 3, 1, 1, 2, 1]
    hiddens = [torch.randn(r, 1, 64, generator=torch.Generator().manual_seed(i)) for i, r in enumerate(rows)]
    got = {}

    async def one(index):
        with batcher.generation():
            await trio.sleep(0.01)  # all registered before anyone asks
            got[index] = await batcher.next_token_logits(hiddens[index])

    async with trio.open_nursery() as nursery:
        for index in range(len(rows)):
            nursery.start_soon(one, index)
    for index, hidden in enumerate(hiddens):
        want = head.logits(hidden)[:, -1]
        assert got[index].shape == want.shape and got[index].dtype == torch.float32
        assert (got[index] - want).abs().max().item() <= LOGITS_ATOL, index
    stats = batcher.stats.as_dict()
    assert stats["steps"] == 1 and stats["max_rows"] == sum(rows) and stats["batched_requests"] == 8, stats


async def test_requests_arriving_during_a_forward_join_the_next_one(head):
    slow = SlowHead(head)
    batcher = slow.batcher()

    async def one(delay):
        with batcher.generation():
            await trio.sleep(delay)
            await batcher.next_token_logits(torch.randn(1, 1, 64))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(one, 0.0)
        for _ in range(5):
            nursery.start_soon(one, 0.02)  # the first forward (50 ms) is running by then
    assert slow.calls == [1, 5]
    assert batcher.stats.threaded_steps == 2  # the loop kept running while the head computed


async def test_a_lone_generation_runs_inline_without_waiting(head):
    """Alone, a request has no checkpoint at all: it completes even inside a cancelled scope, so it
    neither waits for anyone nor hops to a thread."""
    batcher = HeadBatcher(SlowHead(head, seconds=0.01))
    hidden = torch.randn(2, 1, 64)
    with batcher.generation():
        with trio.CancelScope() as scope:
            scope.cancel()
            logits = await batcher.next_token_logits(hidden)
    assert torch.equal(logits, head.logits(hidden)[:, -1])
    assert batcher.stats.threaded_steps == 0 and batcher.stats.steps == 1


async def test_a_head_too_cheap_to_share_runs_at_once(head):
    """The tiny head (~0.03 ms) is not worth a thread hand-off nor lockstep: once measured, every
    request runs at once on the loop, concurrent generations or not."""
    batcher = HeadBatcher(head)
    assert batcher.step_seconds(1, 64) < batcher.min_batch_seconds  # measured once, on zeros

    async def one():
        with batcher.generation():
            for _ in range(3):
                await trio.sleep(0.001)
                await batcher.next_token_logits(torch.randn(1, 1, 64))

    async with trio.open_nursery() as nursery:
        for _ in range(4):
            nursery.start_soon(one)
    stats = batcher.stats.as_dict()
    assert stats["requests"] == stats["steps"] == 12 and stats["threaded_steps"] == 0, stats


async def test_a_cancelled_waiter_leaves_and_the_others_go_on(head):
    slow = SlowHead(head)
    batcher = slow.batcher()
    done = []

    async def one(name, delay, scope_box=None):
        with batcher.generation():
            with trio.CancelScope() as scope:
                if scope_box is not None:
                    scope_box.append(scope)
                await trio.sleep(delay)
                await batcher.next_token_logits(torch.randn(1, 1, 64))
                done.append(name)

    box = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(one, "first", 0.0)
        nursery.start_soon(one, "cancelled", 0.01, box)
        nursery.start_soon(one, "last", 0.02)
        await trio.sleep(0.03)  # both queued behind the first forward
        box[0].cancel()
    assert sorted(done) == ["first", "last"]
    assert slow.calls == [1, 1]  # the cancelled request was dropped from the queue


async def test_an_error_reaches_only_its_own_request(head):
    batcher = HeadBatcher(head, min_batch_seconds=0.0)
    outcomes = {}

    async def one(name, hidden):
        with batcher.generation():
            await trio.sleep(0.01)
            try:
                outcomes[name] = await batcher.next_token_logits(hidden)
            except Exception as exc:  # noqa: BLE001
                outcomes[name] = exc

    async with trio.open_nursery() as nursery:
        nursery.start_soon(one, "good", torch.randn(1, 1, 64))
        nursery.start_soon(one, "bad", torch.randn(1, 1, 64, dtype=torch.float64))  # wrong dtype
        nursery.start_soon(one, "good2", torch.randn(2, 1, 64))
    assert isinstance(outcomes["bad"], Exception)
    assert outcomes["good"].shape[0] == 1 and outcomes["good2"].shape[0] == 2


# ---------------------------------------------------------------------------- real peer processes

PROMPT_LENGTHS = [3, 17, 9, 30, 1, 12, 24, 6]
NEW_TOKENS = 16
SAMPLING = dict(do_sample=True, temperature=0.8, top_k=30, top_p=0.9)


@pytest.fixture(scope="module")
def swarm_client(tiny_llama):
    from molink.swarm import DistributedModelForCausalLM
    from molink.swarm.local_swarm import LocalSwarm

    with LocalSwarm(tiny_llama, [(0, 2), (2, 4), (4, 6)]) as swarm, \
            DistributedModelForCausalLM.from_pretrained(tiny_llama, swarm.initial_peers) as model:
        yield model


@pytest.fixture(scope="module")
def reference(tiny_llama):
    return AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).train(False)


def prompt(length: int, seed: int) -> torch.Tensor:
    return torch.randint(3, 500, (1, length), generator=torch.Generator().manual_seed(seed))


def test_concurrent_generations_share_head_steps_and_match_transformers(swarm_client, reference):
    from molink.swarm.generation import merged_generation_config

    model = swarm_client
    prompts = [prompt(length, seed) for seed, length in enumerate(PROMPT_LENGTHS)]
    expected = [reference.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                                   do_sample=False) for ids in prompts]
    config = merged_generation_config(model.generation_config, max_new_tokens=NEW_TOKENS, do_sample=False)
    model.head_batcher.min_batch_seconds = 0.0  # share even the tiny model's head (SmolLM2's is shared anyway)
    before = model.head_batcher.stats.as_dict()

    got = generate_all_at_once(model, prompts, config)
    for index, (out, want) in enumerate(zip(got, expected)):
        assert torch.equal(out, want), f"generation {index}"
    after = model.head_batcher.stats.as_dict()
    steps, requests = after["steps"] - before["steps"], after["requests"] - before["requests"]
    assert requests >= len(prompts)  # one per generation step (a generation that meets EOS stops early)
    # shared forwards (how many meet depends on timing: 2 shared cores), not one per request
    assert after["max_rows"] >= 2 and steps < requests, after


def test_seeded_generations_get_their_own_samples_next_to_others(swarm_client, reference):
    """Each seeded generation draws from its own generator: the tokens of torch.manual_seed(seed) +
    transformers' generate, while other generations (seeded and not) sample on the same loop."""
    from molink.swarm.generation import generate_with_chain, merged_generation_config

    model = swarm_client
    seeds = [11, 12, 13]
    prompts = [prompt(length, 40 + i) for i, length in enumerate([5, 14, 9, 7])]
    expected = []
    for seed, ids in zip(seeds, prompts):
        torch.manual_seed(seed)
        expected.append(reference.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                                           **SAMPLING))
    config = merged_generation_config(model.generation_config, max_new_tokens=NEW_TOKENS, **SAMPLING)

    async def together():
        results = {}

        async def one(index, ids, generator):
            chain = await model.open_chain(1, ids.shape[1] + NEW_TOKENS)
            try:
                results[index] = await generate_with_chain(model.head_batcher, chain, ids, None, config,
                                                           generator=generator)
            finally:
                await chain.close()

        async with trio.open_nursery() as nursery:
            for index, ids in enumerate(prompts):
                generator = torch.Generator().manual_seed(seeds[index]) if index < len(seeds) else None
                nursery.start_soon(one, index, ids, generator)  # the last one: torch's global stream
        return results

    results = model._run(together)
    for index, want in enumerate(expected):
        assert torch.equal(results[index], want), f"seeded generation {index}"
