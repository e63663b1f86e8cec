"""A span of transformer blocks [start, end) loaded on its own, and the sessions that run through it.

This is the peer's model runner: it holds only the span's weights, keeps one KV cache per
session (transformers' `DynamicCache`, with layers written at their global index), and derives
each new token's position from the session's attention mask exactly as `generate` does, so the
client never has to send positions (one less thing to trust from the network).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import DynamicCache, PretrainedConfig

from molink.peer.checkpoint import Checkpoint, load_config, materialize
from molink.peer.families import FamilyAdapter, get_family

logger = logging.getLogger(__name__)


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position of every token given a left-padded 0/1 mask (as transformers' generate computes it)."""
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.masked_fill(attention_mask == 0, 0)


@dataclass(eq=False)
class SpanSession:
    """One generation's state on this span: its KV cache and the mask of every token seen.

    While it runs in a `StackedBatch` (stacked_cache.py) its KV and mask live there, stacked with
    the others'; `attention_mask` and `seen_tokens` read them from there, and `detach` takes them
    back before anything touches `cache` directly.
    """

    cache: DynamicCache | None  # None once closed
    start: int  # the blocks this session runs: a sub-range of the span is allowed
    end: int
    own_mask: torch.Tensor | None = None  # [batch, tokens seen] int64, when not stacked
    steps: int = field(default=0)
    stacked: Any = None  # the StackedBatch holding its KV, if any
    max_length: int | None = None  # tokens per row it reserved (the handler sets it): a stack never pads past it

    @property
    def attention_mask(self) -> torch.Tensor | None:
        return self.own_mask if self.stacked is None else self.stacked.mask_of(self)

    @attention_mask.setter
    def attention_mask(self, mask: torch.Tensor | None) -> None:
        self.own_mask = mask

    @property
    def batch_size(self) -> int | None:
        mask = self.attention_mask
        return None if mask is None else mask.shape[0]

    @property
    def seen_tokens(self) -> int:
        if self.stacked is not None:
            return self.stacked.seen_tokens(self)
        return 0 if self.own_mask is None else self.own_mask.shape[1]

    def detach(self) -> None:
        """Own cache and mask again (dissolves the stacked batch it was in, if any)."""
        stacked = self.stacked
        if stacked is not None:
            stacked.dissolve()

    def close(self) -> None:
        """Free the KV now (a stacked batch it is in gives the others their rows back at once, or
        right after the forward running on it)."""
        stacked = self.stacked  # read once: the scheduler's worker may dissolve it meanwhile
        if stacked is not None:
            stacked.leave(self)
        self.cache = None


class SpanModel:
    """Blocks [start, end) of one model, ready to run sessions."""

    def __init__(self, config: PretrainedConfig, family: FamilyAdapter, start: int, end: int,
                 blocks: list[torch.nn.Module], device: torch.device, dtype: torch.dtype):
        self.config, self.family = config, family
        self.start, self.end = start, end
        self.blocks = blocks
        self.device, self.dtype = device, dtype
        self.context = family.make_span_context(config, device)
        self._kv_bytes_per_block: int | None = None

    @classmethod
    def load(cls, model_dir: str | Path, start: int, end: int, *, dtype: torch.dtype | None = None,
             device: str | torch.device = "cpu", progress: bool = True) -> "SpanModel":
        config = load_config(model_dir)
        family = get_family(config)
        if not 0 <= start < end <= config.num_hidden_layers:
            raise ValueError(f"span [{start}, {end}) is outside the model's {config.num_hidden_layers} blocks")
        checkpoint = Checkpoint.open(model_dir)
        dtype = dtype or _config_dtype(config)
        device = torch.device(device)
        blocks = []
        for index in tqdm(range(start, end), desc=f"loading blocks {start}:{end}", unit="block",
                          disable=not progress, leave=False):
            block = family.build_block(config, index)
            prefix = family.block_prefix(config, index)
            tensors = checkpoint.load(checkpoint.names_with_prefix(prefix), dtype=dtype, device=device)
            materialize(block, tensors, prefix)
            blocks.append(block.train(False).requires_grad_(False))  # inference mode (no dropout)
        logger.info("loaded blocks %d:%d of %s (%s, %s)", start, end, model_dir, dtype, device)
        return cls(config, family, start, end, blocks, device, dtype)

    def new_session(self, start: int | None = None, end: int | None = None,
                    max_length: int | None = None) -> SpanSession:
        start = self.start if start is None else start
        end = self.end if end is None else end
        if not self.start <= start < end <= self.end:
            raise ValueError(f"blocks [{start}, {end}) are not within this span [{self.start}, {self.end})")
        return SpanSession(cache=DynamicCache(config=self.config), start=start, end=end, max_length=max_length)

    def kv_bytes_per_token(self, num_blocks: int | None = None) -> int:
        """KV-cache bytes one token of one sequence takes in `num_blocks` blocks (default: the span).

        Measured, not computed from the config: multi-query Falcon, latent attention (DeepSeek)
        and the like cache other shapes than 2 x kv_heads x head_dim, and a formula that
        undercounts lets a peer promise memory it does not have. One probe token through a
        throw-away session, once per span.
        """
        if self._kv_bytes_per_block is None:
            session = self.new_session()
            hidden = torch.zeros(1, 1, self.config.hidden_size, dtype=self.dtype, device=self.device)
            self.step(session, hidden, torch.ones(1, 1, dtype=torch.long))
            total = 0
            for layer in getattr(session.cache, "layers", []):
                for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None)):
                    if isinstance(tensor, torch.Tensor):
                        total += tensor.numel() * tensor.element_size()
            self._kv_bytes_per_block = max(1, total // len(self.blocks))
        return self._kv_bytes_per_block * (num_blocks or len(self.blocks))

    @torch.inference_mode()
    def step(self, session: SpanSession, hidden_states: torch.Tensor, new_mask: torch.Tensor) -> torch.Tensor:
        """Run the span over `hidden_states` [batch, new, hidden] whose 0/1 mask is `new_mask` [batch, new]."""
        session.detach()
        mask = new_mask.to(self.device, torch.long)
        full_mask = mask if session.attention_mask is None else torch.cat([session.attention_mask, mask], dim=1)
        out = self.run(session.start, session.end, hidden_states, full_mask, session.cache)
        session.attention_mask = full_mask
        session.steps += 1
        return out

    def run(self, start: int, end: int, hidden_states: torch.Tensor, full_mask: torch.Tensor,
            cache: DynamicCache) -> torch.Tensor:
        """Blocks [start, end) over new hidden states [rows, n, hidden]; `full_mask` [rows, past + n]
        is every token's 0/1 mask (the positions of the new ones come from it), `cache` the past."""
        positions = positions_from_mask(full_mask)[:, -hidden_states.shape[1]:]
        blocks = self.blocks[start - self.start: end - self.start]
        return self.family.run_blocks(self.context, blocks, start, hidden_states.to(self.device, self.dtype),
                                      full_mask, positions, cache)


def _config_dtype(config: PretrainedConfig) -> torch.dtype:
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32
