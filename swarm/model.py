"""What a user of the swarm holds: a causal LM whose blocks run elsewhere.

`SwarmModelBase` owns the client-side pieces (embeddings, final norm, lm_head), the generation
defaults and the `generate` front end; subclasses only say how to open a chain of spans for one
generation. `LocalSpansModelForCausalLM` runs the spans in this process (the single-process demo
and the benchmark of our seam); the network version lives in `molink.swarm.distributed`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path

import torch
import trio
from transformers import GenerationConfig

from molink.peer.checkpoint import load_config, resolve_model_dir
from molink.peer.span import SpanModel
from molink.swarm.client_head import load_client_head
from molink.swarm.generation import SpanChain, generate_with_chain, max_new_tokens_of, merged_generation_config
from molink.swarm.head_batcher import HeadBatcher
from molink.swarm.micro_batches import check_setting, generate_in_micro_batches, micro_batch_count
from molink.swarm.pipeline_cost import ASSUMED_LINK_RATE


class SwarmModelBase(ABC):
    def __init__(self, model_dir: Path, dtype: torch.dtype = torch.float32):
        self.model_dir = Path(model_dir)
        self.config = load_config(model_dir)
        self.dtype = dtype
        self.head = load_client_head(model_dir, dtype=dtype)
        # concurrent generations (API requests, micro-batches) share one lm_head forward per step
        self.head_batcher = HeadBatcher(self.head)
        # one generate call's batch split into sessions pipelined along the route (micro_batches.py):
        # 1 = never, an int = that many, "auto" = what pipeline_cost.py expects to be fastest
        self.micro_batches: int | str = 1
        self.link_rate = ASSUMED_LINK_RATE  # bytes/s the "auto" rule assumes per link
        try:
            self.generation_config = GenerationConfig.from_pretrained(model_dir, local_files_only=True)
        except OSError:
            self.generation_config = GenerationConfig.from_model_config(self.config)

    @abstractmethod
    async def open_chain(self, batch_size: int, max_length: int) -> SpanChain:
        """A fresh chain of spans covering every block, for one generation of up to max_length tokens."""

    @abstractmethod
    def _run(self, async_fn, *args):
        """Run `async_fn(*args)` to completion on the event loop this model uses."""

    async def planned_route(self, batch_size: int, max_length: int) -> list | None:
        """The route a session of this shape would take now, for sizing micro-batches; None when
        the spans do not run concurrently (in this process)."""
        return None

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 streamer=None, micro_batches: int | str | None = None, **options) -> torch.Tensor:
        """Same contract as transformers' `generate` for the options in SUPPORTED_OPTIONS.

        micro_batches: split the batch into that many pipelined sessions ("auto": the cost rule
        of swarm/pipeline_cost.py; default: `self.micro_batches`); greedy decoding only."""
        if input_ids.dim() != 2:
            raise ValueError("input_ids must be [batch, prompt length]")
        config = merged_generation_config(self.generation_config, **options)
        if micro_batches is not None:
            check_setting(micro_batches)
        return self._run(self.generate_async, input_ids, attention_mask, config, streamer, micro_batches)

    async def generate_async(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                             config, streamer=None, micro_batches: int | str | None = None) -> torch.Tensor:
        max_length = input_ids.shape[1] + max_new_tokens_of(config, input_ids.shape[1])
        setting = self.micro_batches if micro_batches is None else micro_batches
        k = await micro_batch_count(self, setting, input_ids.shape[0], max_length, config, streamer)
        if k > 1:
            return await generate_in_micro_batches(self, input_ids, attention_mask, config, k, max_length)
        chain = await self.open_chain(input_ids.shape[0], max_length)
        try:
            return await generate_with_chain(self.head_batcher, chain, input_ids, attention_mask, config, streamer)
        finally:
            await chain.close()

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class LocalSpanChain:
    """Spans run one after another in this process: one session per span."""

    def __init__(self, spans: list[SpanModel]):
        self.spans = spans
        self.sessions = [span.new_session() for span in spans]

    async def step(self, hidden_states: torch.Tensor, new_mask: torch.Tensor) -> torch.Tensor:
        for span, session in zip(self.spans, self.sessions):
            hidden_states = span.step(session, hidden_states, new_mask)
        return hidden_states

    async def close(self) -> None:
        self.sessions.clear()


def even_boundaries(num_blocks: int, num_spans: int) -> list[tuple[int, int]]:
    edges = [round(i * num_blocks / num_spans) for i in range(num_spans + 1)]
    return [(a, b) for a, b in zip(edges, edges[1:]) if a < b]


class LocalSpansModelForCausalLM(SwarmModelBase):
    """The model split into spans, all run in this process (no network)."""

    def __init__(self, model_dir: Path, spans: list[SpanModel], dtype: torch.dtype):
        super().__init__(model_dir, dtype)
        self.spans = spans

    @classmethod
    def from_pretrained(cls, path_or_id: str | Path, spans: list[tuple[int, int]] | int = 3,
                        dtype: torch.dtype = torch.float32, progress: bool = True) -> "LocalSpansModelForCausalLM":
        model_dir = resolve_model_dir(path_or_id)
        if isinstance(spans, int):
            spans = even_boundaries(load_config(model_dir).num_hidden_layers, spans)
        loaded = [SpanModel.load(model_dir, a, b, dtype=dtype, progress=progress) for a, b in spans]
        return cls(model_dir, loaded, dtype)

    async def open_chain(self, batch_size: int, max_length: int) -> SpanChain:
        return LocalSpanChain(self.spans)

    def _run(self, async_fn, *args):
        return trio.run(async_fn, *args)
