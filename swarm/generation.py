"""Token generation over any chain of spans, returning what transformers' `generate` returns.

The loop mirrors `GenerationMixin._sample` step for step (same logits processors in the same
order, same float32 scores, same `torch.multinomial` call per step, same padding of finished
rows), so greedy decoding gives identical tokens and seeded sampling gives identical samples.
The processors themselves are transformers' classes: we only choose and order them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from transformers import GenerationConfig
from transformers.generation.logits_process import (
    LogitsProcessorList,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from molink.peer.families import ClientHead
from molink.peer.scheduler import tune_gc
from molink.peer.span import positions_from_mask
from molink.swarm.failover import RollBack
from molink.swarm.head_batcher import HeadBatcher
from molink.swarm.prefill_plan import MIN_CHUNK, fixed_chunks

#: generation options this loop implements; anything else is refused rather than ignored
SUPPORTED_OPTIONS = {
    "max_new_tokens", "max_length", "do_sample", "temperature", "top_k", "top_p", "min_p",
    "repetition_penalty", "eos_token_id", "pad_token_id", "bos_token_id",
}


class SpanChain(Protocol):
    """All blocks of the model for one generation session, in order."""

    async def step(self, hidden_states: torch.Tensor, new_mask: torch.Tensor) -> torch.Tensor:
        """Hidden states of the new tokens through every block (caches kept between calls)."""

    async def close(self) -> None: ...


def merged_generation_config(model_config: GenerationConfig | None, **options) -> GenerationConfig:
    """The model's generation defaults, then transformers' global defaults, then the caller's options."""
    unknown = {k for k, v in options.items() if v is not None} - SUPPORTED_OPTIONS
    if unknown:
        raise ValueError(f"unsupported generation options: {sorted(unknown)}; supported: {sorted(SUPPORTED_OPTIONS)}")
    config = GenerationConfig()
    if model_config is not None:
        config.update(**model_config.to_dict(), defaults_only=True)
    config.update(**GenerationConfig._get_default_generation_params(), defaults_only=True)
    config.update(**{k: v for k, v in options.items() if v is not None})
    return config


def logits_processors(config: GenerationConfig, attention_mask: torch.Tensor) -> LogitsProcessorList:
    processors = LogitsProcessorList()
    if config.repetition_penalty is not None and config.repetition_penalty != 1.0:
        padding_lengths = (attention_mask != 0).int().argmax(dim=1)
        processors.append(RepetitionPenaltyLogitsProcessor(config.repetition_penalty,
                                                           prompt_ignore_length=padding_lengths))
    if config.do_sample:
        if config.temperature is not None and config.temperature != 1.0:
            processors.append(TemperatureLogitsWarper(config.temperature))
        if config.top_k is not None and config.top_k != 0:
            processors.append(TopKLogitsWarper(top_k=config.top_k, min_tokens_to_keep=1))
        if config.top_p is not None and config.top_p < 1.0:
            processors.append(TopPLogitsWarper(top_p=config.top_p, min_tokens_to_keep=1))
        if config.min_p is not None:
            processors.append(MinPLogitsWarper(min_p=config.min_p, min_tokens_to_keep=1))
    return processors


def _eos_and_pad(config: GenerationConfig) -> tuple[torch.Tensor | None, int | None]:
    eos = config.eos_token_id
    if eos is None:
        return None, config.pad_token_id
    eos = torch.tensor([eos] if isinstance(eos, int) else list(eos), dtype=torch.long)
    pad = config.pad_token_id if config.pad_token_id is not None else int(eos[0])
    return eos, pad


def max_new_tokens_of(config: GenerationConfig, prompt_length: int) -> int:
    if config.max_new_tokens is not None:
        return config.max_new_tokens
    return max(0, config.max_length - prompt_length)


async def run_step(chain: SpanChain, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """One step of new tokens through the chain; a long prompt goes through in pipelined chunks.
    Only the last position's output is needed (logits come from it): a chain that can trim
    (`trims_outputs`) brings back just that one, not tokens x hidden on the last link for nothing."""
    options = {"last_only": True} if getattr(chain, "trims_outputs", False) else {}
    if not getattr(chain, "pipelined", False) or hidden.shape[1] < 2 * MIN_CHUNK:  # decode steps, short prompts
        return await chain.step(hidden, mask, **options)
    # a chain that knows its route sizes the chunks by it (prefill_plan.py); others: the fixed rule
    plan = getattr(chain, "prefill_chunks", None)
    sizes = await plan(hidden.shape[1]) if plan is not None else fixed_chunks(hidden.shape[1])
    if len(sizes) == 1:
        return await chain.step(hidden, mask, **options)
    items, start = [], 0
    for size in sizes:
        items.append((hidden[:, start:start + size], mask[:, start:start + size]))
        start += size
    return (await chain.step_many(items, **options))[-1]


@dataclass
class _Before:
    """The loop's state before one generation step: where a spot check's rollback returns to."""

    history: int
    input_ids: torch.Tensor
    step_ids: torch.Tensor
    step_mask: torch.Tensor
    seen_mask: torch.Tensor
    unfinished: torch.Tensor
    rng: torch.Tensor | None


async def generate_with_chain(head: ClientHead | HeadBatcher, chain: SpanChain, input_ids: torch.Tensor,
                              attention_mask: torch.Tensor | None, config: GenerationConfig,
                              streamer=None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Run the sampling loop; returns prompt + new tokens, [batch, prompt + new], like `generate`.

    `head`: the model's shared HeadBatcher, so that concurrent generations share one lm_head
    forward per step (swarm/head_batcher.py), or a bare ClientHead (a generation of its own).
    `generator`: the random stream sampling draws from (default: torch's global one);
    `torch.Generator().manual_seed(s)` gives the samples of `torch.manual_seed(s)` + `generate`,
    whatever other generations run on the same loop meanwhile.
    """
    tune_gc()  # the model is loaded: a client now serves steps (peer/scheduler.py)
    batcher = HeadBatcher.of(head)
    with batcher.generation():
        return await _sample(batcher, chain, input_ids, attention_mask, config, streamer,
                             generator if generator is not None else torch.default_generator)


async def _sample(head: HeadBatcher, chain: SpanChain, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                  config: GenerationConfig, streamer, rng: torch.Generator) -> torch.Tensor:
    """The loop of generate_with_chain.

    Async so that a remote chain's steps run on the swarm's event loop with no thread hop per
    token; of the torch work here only the lm_head is heavy, and it is shared and threaded
    (head_batcher.py). Sampling stays here: each generation's processors and draws run in its
    own order, with no await between a draw's logits and the draw. A chain with spot checks
    (swarm/failover.py) may raise RollBack: a peer lied from some step on, so the loop returns to
    its state before that step (tokens, masks, and the sampler's random state) and goes on; the
    chain replays the good history through honest peers. (Tokens already given to a streamer are
    not taken back; the returned tensor is exact.)
    """
    input_ids = input_ids.long()
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    attention_mask = attention_mask.long()
    processors = logits_processors(config, attention_mask)
    eos, pad = _eos_and_pad(config)
    unfinished = torch.ones(input_ids.shape[0], dtype=torch.long)
    if streamer is not None:
        streamer.put(input_ids.cpu())
    step_ids, step_mask = input_ids, attention_mask
    seen_mask = attention_mask  # every token so far: learned absolute positions come from it
    rewinds = hasattr(chain, "rewind")
    before: list[_Before] = []
    new_tokens = max_new_tokens_of(config, input_ids.shape[1])
    while True:
        if len(before) == new_tokens or (eos is not None and before and unfinished.max() == 0):
            try:
                if rewinds:
                    await chain.settle()
                break
            except RollBack as rollback:
                state = _rewind(chain, before, rollback)
        else:
            if rewinds:
                before.append(_Before(len(chain.history), input_ids, step_ids, step_mask, seen_mask, unfinished,
                                      rng.get_state() if config.do_sample else None))
            positions = positions_from_mask(seen_mask)[:, -step_ids.shape[1]:] if head.needs_positions else None
            try:
                hidden = await run_step(chain, head.embed(step_ids, positions), step_mask)
            except RollBack as rollback:
                state = _rewind(chain, before, rollback)
            else:
                state = None
        if state is not None:
            input_ids, step_ids, step_mask, seen_mask, unfinished = (
                state.input_ids, state.step_ids, state.step_mask, state.seen_mask, state.unfinished)
            if state.rng is not None:
                rng.set_state(state.rng)
            continue
        logits = await head.next_token_logits(hidden[:, -1:])  # [batch, vocab] float32, our own copy
        with torch.inference_mode():
            scores = processors(input_ids, logits)
        if config.do_sample:
            probs = torch.nn.functional.softmax(scores, dim=-1)
            next_tokens = torch.multinomial(probs, num_samples=1, generator=rng).squeeze(1)
        else:
            next_tokens = torch.argmax(scores, dim=-1)
        if eos is not None:
            next_tokens = next_tokens * unfinished + pad * (1 - unfinished)
        input_ids = torch.cat([input_ids, next_tokens[:, None]], dim=-1)
        if streamer is not None:
            streamer.put(next_tokens.cpu())
        if eos is not None:
            unfinished = unfinished & ~torch.isin(next_tokens, eos)
        step_ids, step_mask = next_tokens[:, None], torch.ones_like(next_tokens[:, None])
        seen_mask = torch.cat([seen_mask, step_mask], dim=-1)
        if not rewinds:
            before.append(None)  # only counted
    if streamer is not None:
        streamer.end()
    return input_ids


def _rewind(chain, before: list[_Before], rollback: RollBack) -> _Before:
    """Drop every generation step whose chain history reaches the bad step; the state to resume."""
    while len(before) > 1 and before[-1].history > rollback.step:
        before.pop()
    state = before.pop()
    chain.rewind(state.history)
    return state
