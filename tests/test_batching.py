"""Continuous batching on a peer: sessions batched together get exactly what each would get alone.

In process: spans driven through `StepScheduler`s (one per span, as one per peer), many sessions
at once, checked token for token (and logits within float tolerance) against transformers'
greedy `generate` for each prompt alone. Over real peer processes: concurrent generations on a
LocalSwarm, checked the same way, with the peers' own counters showing they did batch.
"""

from __future__ import annotations

import pytest
import torch
import trio
from transformers import AutoModelForCausalLM

from molink.peer.batched_span import StepWork, batchable, step_batched
from molink.peer.scheduler import BatchingConfig, StepScheduler
from molink.swarm.model import LocalSpansModelForCausalLM
from tests.concurrent_generations import generate_all_at_once

SPANS = [(0, 2), (2, 4)]
PROMPT_LENGTHS = [3, 17, 9, 30, 1, 12, 24, 6]  # 8 sessions, all different
NEW_TOKENS = 12
LOGITS_ATOL = 1e-4  # observed <= 2e-5: batched matmuls round differently, nothing more


def prompt(length: int, seed: int) -> torch.Tensor:
    return torch.randint(3, 500, (1, length), generator=torch.Generator().manual_seed(seed))


def expected_greedy(model_dir, prompts: list[torch.Tensor]):
    ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = []
    for ids in prompts:
        result = ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False,
                              eos_token_id=None, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
        out.append((result.sequences[0, ids.shape[1]:], torch.stack(result.logits, 1)[0]))
    return out


class ScheduledChain:
    """One generation through the spans, each span's steps going through its own scheduler."""

    def __init__(self, spans, schedulers):
        self.spans, self.schedulers = spans, schedulers
        self.sessions = [span.new_session() for span in spans]

    async def step(self, hidden, mask):
        for span, scheduler, session in zip(self.spans, self.schedulers, self.sessions):
            hidden = await scheduler.submit(span, StepWork(session, hidden, mask))
        return hidden


async def greedy(model, chain: ScheduledChain, ids: torch.Tensor, steps: int):
    """Greedy decoding through the chain; tokens [steps] and logits [steps, vocab]."""
    head, tokens, logits = model.head, [], []
    positions = torch.arange(ids.shape[1])[None]
    step_ids, step_mask = ids, torch.ones_like(ids)
    for _ in range(steps):
        embedded = head.embed(step_ids, positions if head.needs_positions else None)
        hidden = await chain.step(embedded, step_mask)
        step_logits = head.logits(hidden)[:, -1]
        tokens.append(step_logits.argmax(-1))
        logits.append(step_logits)
        step_ids, step_mask = tokens[-1][:, None], torch.ones(1, 1, dtype=torch.long)
        positions = positions[:, -1:] + 1
        await trio.sleep(0)
    return torch.cat(tokens), torch.cat(logits)


async def run_sessions(model, prompts, config: BatchingConfig, steps: int = NEW_TOKENS):
    schedulers = [StepScheduler(config) for _ in model.spans]
    results: dict[int, tuple] = {}
    async with trio.open_nursery() as workers:
        for scheduler in schedulers:
            await workers.start(scheduler.run)
        async with trio.open_nursery() as sessions:
            for index, ids in enumerate(prompts):
                async def one(index=index, ids=ids):
                    results[index] = await greedy(model, ScheduledChain(model.spans, schedulers), ids, steps)
                sessions.start_soon(one)
        workers.cancel_scope.cancel()
    return [results[i] for i in range(len(prompts))], schedulers


def assert_matches(got, expected) -> None:
    for index, ((tokens, logits), (want_tokens, want_logits)) in enumerate(zip(got, expected)):
        assert torch.equal(tokens, want_tokens), f"session {index}: {tokens} != {want_tokens}"
        assert (logits - want_logits).abs().max().item() <= LOGITS_ATOL, f"session {index}"


# ---------------------------------------------------------------------------- in process


@pytest.mark.parametrize("family,overrides", [
    ("llama", {}),
    ("qwen2", {"use_sliding_window": False}),  # Qwen2 as released: full attention everywhere
    ("gpt2", {}),  # learned positions on the client, no rotary
], ids=["llama", "qwen2", "gpt2"])
async def test_eight_concurrent_sessions_batched_match_transformers(tiny_model_factory, family, overrides):
    model_dir = tiny_model_factory(family, layers=4, **overrides)
    model = LocalSpansModelForCausalLM.from_pretrained(model_dir, SPANS, progress=False)
    prompts = [prompt(length, seed) for seed, length in enumerate(PROMPT_LENGTHS)]
    got, schedulers = await run_sessions(model, prompts, BatchingConfig(window=0.02))
    assert_matches(got, expected_greedy(model_dir, prompts))
    for scheduler in schedulers:
        stats = scheduler.stats.as_dict()
        assert stats["max_batch"] >= 4, stats  # sessions of different lengths did share forwards
        assert stats["mean_decode_batch"] > 2, stats


async def test_sliding_window_spans_run_one_by_one_and_stay_exact(tiny_model_factory):
    model_dir = tiny_model_factory("mistral", layers=4)  # sliding_window=16, shorter than the sessions
    model = LocalSpansModelForCausalLM.from_pretrained(model_dir, SPANS, progress=False)
    assert not batchable(model.spans[0], model.spans[0].new_session())
    prompts = [prompt(length, seed) for seed, length in enumerate(PROMPT_LENGTHS[:4])]
    got, schedulers = await run_sessions(model, prompts, BatchingConfig(window=0.02))
    assert_matches(got, expected_greedy(model_dir, prompts))
    assert schedulers[0].stats.max_rows == 1


async def test_long_prompt_is_chunked_behind_decode_steps(tiny_llama):
    """Decode-first: while a 300-token prompt runs in 32-token chunks, the decoding sessions keep
    getting a forward every round; the chunked prompt's output equals the unchunked one."""
    model = LocalSpansModelForCausalLM.from_pretrained(tiny_llama, [(0, 6)], progress=False)
    span = model.spans[0]
    scheduler = StepScheduler(BatchingConfig(window=0.0, max_tokens=32))
    long_hidden = torch.randn(1, 300, span.config.hidden_size, generator=torch.Generator().manual_seed(0))
    decoders = [span.new_session() for _ in range(3)]
    events: list[str] = []

    async def decode(session, name):
        await scheduler.submit(span, StepWork(session, torch.randn(1, 5, 64), torch.ones(1, 5, dtype=torch.long)))
        for _ in range(12):
            await scheduler.submit(span, StepWork(session, torch.randn(1, 1, 64), torch.ones(1, 1, dtype=torch.long)))
            events.append(name)

    async def long_prompt(result):
        await trio.sleep(0.05)  # arrives while the others decode
        session = span.new_session()
        result.append(await scheduler.submit(span, StepWork(session, long_hidden, torch.ones(1, 300, dtype=torch.long))))
        events.append("prompt")

    result: list[torch.Tensor] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(scheduler.run)
        async with trio.open_nursery() as clients:
            for index, session in enumerate(decoders):
                clients.start_soon(decode, session, f"d{index}")
            clients.start_soon(long_prompt, result)
        nursery.cancel_scope.cancel()
    assert scheduler.stats.prefill_chunks >= 300 // 32 + 3  # 3 short prompts + 10 chunks
    alone = span.step(span.new_session(), long_hidden, torch.ones(1, 300, dtype=torch.long))
    assert (result[0] - alone).abs().max().item() <= 1e-4 * alone.abs().max().item()
    finished = events.index("prompt")
    assert 0 < finished < len(events) - 1 or events.count("d0") == 12
    assert events[:finished].count("d0") >= 5, "decoders froze while the prompt ran"


async def test_row_limit_serves_everyone_in_order(tiny_llama, monkeypatch):
    """With room for 2 rows per forward, 6 waiting sessions all finish, oldest first, in 3 forwards."""
    from molink.peer import scheduler as scheduler_module

    model = LocalSpansModelForCausalLM.from_pretrained(tiny_llama, [(0, 6)], progress=False)
    span = model.spans[0]
    scheduler = StepScheduler(BatchingConfig(window=0.0, max_rows=2))
    sessions = [span.new_session() for _ in range(6)]
    for session in sessions:
        span.step(session, torch.randn(1, 4, 64), torch.ones(1, 4, dtype=torch.long))
    submitted: list[int] = []
    forwards: list[list[int]] = []  # the sessions of each forward, as the scheduler ran them
    step_batched = scheduler_module.step_batched

    def recorded(span, works, stats):
        forwards.append([sessions.index(work.session) for work in works])
        return step_batched(span, works, stats)

    monkeypatch.setattr(scheduler_module, "step_batched", recorded)
    done: list[int] = []

    async def one(index):
        submitted.append(index)  # submit() queues before its first checkpoint: this is the queue order
        await scheduler.submit(span, StepWork(sessions[index], torch.randn(1, 1, 64), torch.ones(1, 1, dtype=torch.long)))
        done.append(index)

    async with trio.open_nursery() as nursery:
        for index in range(6):
            nursery.start_soon(one, index)
        await trio.sleep(0.01)  # all six queued before the worker starts
        await nursery.start(scheduler.run)
        while len(done) < 6:
            await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    assert forwards == [submitted[0:2], submitted[2:4], submitted[4:6]]
    assert scheduler.stats.max_rows == 2


async def test_one_bad_step_fails_only_its_own_session(tiny_llama):
    model = LocalSpansModelForCausalLM.from_pretrained(tiny_llama, [(0, 6)], progress=False)
    span = model.spans[0]
    scheduler = StepScheduler(BatchingConfig(window=0.0))
    sessions = [span.new_session() for _ in range(3)]
    for session in sessions:
        span.step(session, torch.randn(1, 4, 64), torch.ones(1, 4, dtype=torch.long))
    inputs = [torch.randn(1, 1, 64), torch.randn(1, 1, 32), torch.randn(1, 1, 64)]  # the middle one is wrong
    outcomes: dict[int, object] = {}

    async def one(index):
        try:
            outcomes[index] = await scheduler.submit(span, StepWork(sessions[index], inputs[index],
                                                                    torch.ones(1, 1, dtype=torch.long)))
        except Exception as exc:  # noqa: BLE001
            outcomes[index] = exc

    async with trio.open_nursery() as nursery:
        for index in range(3):
            nursery.start_soon(one, index)
        await trio.sleep(0.01)
        await nursery.start(scheduler.run)
        while len(outcomes) < 3:
            await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    assert isinstance(outcomes[1], Exception)
    for index in (0, 2):
        assert isinstance(outcomes[index], torch.Tensor) and outcomes[index].shape == (1, 1, 64)
        assert sessions[index].seen_tokens == 5


def test_sessions_without_past_and_with_padding_batch_exactly(tiny_llama):
    """First steps (empty caches) and sessions with their own left padding, batched together."""
    model = LocalSpansModelForCausalLM.from_pretrained(tiny_llama, [(0, 6)], progress=False)
    span = model.spans[0]
    gen = torch.Generator().manual_seed(3)
    masks = [torch.tensor([[0, 0, 1, 1]]), torch.ones(2, 4, dtype=torch.long), torch.tensor([[1, 1, 1, 1]])]
    masks[1][1, 0] = 0
    hiddens = [torch.randn(m.shape[0], 4, 64, generator=gen) for m in masks]
    alone = [span.step(span.new_session(), h, m) for h, m in zip(hiddens, masks)]
    sessions = [span.new_session() for _ in masks]
    batched = step_batched(span, [StepWork(s, h, m) for s, h, m in zip(sessions, hiddens, masks)])
    for got, want, mask in zip(batched, alone, masks):
        keep = mask.bool()  # padded positions' outputs are garbage in both, and never used
        assert torch.allclose(got[keep], want[keep], atol=1e-5)
    assert [s.seen_tokens for s in sessions] == [4, 4, 4]


def test_batching_config_from_env(monkeypatch):
    monkeypatch.setenv("MOLINK_BATCHING", "0")
    monkeypatch.setenv("MOLINK_BATCH_WINDOW_MS", "0.5")
    config = BatchingConfig.from_env(max_rows=8)
    assert (config.enabled, config.window, config.max_rows) == (False, 0.0005, 8)
    with pytest.raises(ValueError):
        BatchingConfig.from_env(max_rows=0)


# ---------------------------------------------------------------------------- every family

#: families whose tiny test model has sliding-window layers are tested with them turned off (as
#: most of their releases ship); Gemma2/3 always have sliding layers and run one by one
NO_SLIDING = {"use_sliding_window": False, "sliding_window": None}
FAMILY_CASES = {
    "llama": {}, "gemma": {}, "phi": {}, "stablelm": {}, "cohere": {}, "olmo2": {}, "granite": {},
    "gpt2": {}, "opt": {}, "gpt_neox": {}, "gptj": {}, "falcon": {}, "bloom": {},
    "deepseek_v2": {}, "deepseek_v3": {},
    "mistral": NO_SLIDING, "mixtral": NO_SLIDING, "qwen2": NO_SLIDING, "qwen2_moe": NO_SLIDING,
    "qwen3": NO_SLIDING, "qwen3_moe": NO_SLIDING, "phi3": NO_SLIDING, "starcoder2": NO_SLIDING,
    "gemma2": {}, "gemma3_text": {},
}
UNBATCHABLE = {"gemma2", "gemma3_text"}
QUICK_FAMILIES = {"falcon", "bloom", "deepseek_v3"}  # ALiBi, multi-query, latent attention (MLA)


@pytest.mark.parametrize("family", [
    pytest.param(f, marks=() if f in QUICK_FAMILIES else pytest.mark.slow) for f in FAMILY_CASES])
async def test_every_family_batched_or_falls_back_exactly(tiny_model_factory, family):
    model_dir = tiny_model_factory(family, layers=4, **FAMILY_CASES[family])
    model = LocalSpansModelForCausalLM.from_pretrained(model_dir, SPANS, progress=False)
    assert batchable(model.spans[0], model.spans[0].new_session()) == (family not in UNBATCHABLE)
    prompts = [prompt(length, seed) for seed, length in enumerate(PROMPT_LENGTHS[:4])]
    got, schedulers = await run_sessions(model, prompts, BatchingConfig(window=0.02), steps=6)
    expected = [(tokens[:6], logits[:6]) for tokens, logits in expected_greedy(model_dir, prompts)]
    assert_matches(got, expected)
    assert (schedulers[0].stats.max_rows == 1) == (family in UNBATCHABLE)


# ---------------------------------------------------------------------------- real peer processes


def test_concurrent_generations_over_real_peers_are_batched_and_exact(tiny_llama):
    """8 generations at once from one client over 3 peer processes: each gets transformers' tokens,
    the peers report forwards that carried several sessions, and the steps travelled bundled."""
    from molink.swarm import DistributedModelForCausalLM
    from molink.swarm.generation import merged_generation_config
    from molink.swarm.local_swarm import LocalSwarm
    from tests.test_swarm import peer_infos

    reference = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    prompts = [prompt(length, seed) for seed, length in enumerate(PROMPT_LENGTHS)]
    expected = [reference.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False)
                for ids in prompts]
    with LocalSwarm(tiny_llama, [(0, 1), (1, 4), (4, 6)], extra_args=["--batch-window-ms", "3"]) as swarm, \
            DistributedModelForCausalLM.from_pretrained(tiny_llama, swarm.initial_peers) as model:
        config = merged_generation_config(model.generation_config, max_new_tokens=24, do_sample=False)

        got = generate_all_at_once(model, prompts, config)
        infos = trio.run(peer_infos, [peer.address for peer in swarm.peers])
        bundles = model.step_bundles.stats
    for index, (out, want) in enumerate(zip(got, expected)):
        assert torch.equal(out, want), f"session {index}"
    # their decode steps travelled in shared frames hop to hop (swarm/step_bundles.py)
    assert bundles.frames > 0 and bundles.steps >= 2 * bundles.frames, bundles
    # with their hidden states stacked in one tensor, there and back (audited sessions' beside it)
    assert bundles.stacked > 0 and bundles.stacked_results > 0, bundles
    for info in infos:
        assert info["batching"]["max_batch"] >= 4, info
        # how many steps meet in one forward depends on timing (2 shared cores): "more than one"
        assert info["batching"]["mean_decode_batch"] > 1.2, info
    # Whether the same group meets twice in a row at a peer (its KV then still stacked,
    # peer/stacked_cache.py) depends on timing: under suite load no peer saw it in 1 of 3 full runs.
    # Reuse itself is shown deterministically by tests/test_stacked_cache.py, and measured by
    # bench_throughput.py's 'stacked' column.
