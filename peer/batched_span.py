"""Several sessions' steps through one span as ONE forward (continuous batching on a peer).

Each session keeps its own `DynamicCache`; a batched step stacks them for the duration of one
forward, exactly the way transformers runs a left-padded batch:

- every session's KV of every block is left-padded with zeros to the longest session (L) and the
  sessions are stacked along the batch axis, in a throw-away `DynamicCache`;
- the 2-D 0/1 mask of each session (its own padding included) is left-padded with zeros, so the
  family's own mask builder masks the padding out, and positions (derived from the mask with a
  cumulative sum) are each row's own: leading zeros do not change a cumsum;
- the family's `run_blocks` runs once over the stacked hidden states;
- each session then keeps a copy of its rows of the new KV without the padding (a view would keep
  everyone's stacked KV alive), and its mask grows as `SpanModel.step` would have grown it.

Masked keys get exactly zero attention weight, rotary/ALiBi see each row's own positions, and
every other op is per row, so each session gets what it would get alone up to float rounding
(different matmul shapes). tests/test_batching.py holds every family to that.

Supported when every block of the span caches into a plain `DynamicLayer` (full attention).
Sliding-window layers keep only the last W tokens with their own offsets, and other cache
layouts differ again: spans with those run their sessions one by one (`batchable` says which).
Stacking and splitting cost two copies of the batch's KV per forward, the same order as what
`DynamicCache` itself copies every step (its `torch.cat`) and as attention reads anyway.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from molink.peer.span import SpanModel, SpanSession, positions_from_mask


@dataclass
class StepWork:
    """One session's step as the scheduler runs it: new hidden states [b, n, H] and their mask [b, n]."""

    session: SpanSession
    hidden: torch.Tensor
    mask: torch.Tensor

    @property
    def rows(self) -> int:
        return self.hidden.shape[0]

    @property
    def new_tokens(self) -> int:
        return self.hidden.shape[1]


def batchable(span: SpanModel, session: SpanSession) -> bool:
    """Can this session's steps join a batched forward? (Plain full-attention caches only.)"""
    cache = session.cache
    if cache is None or not getattr(span.family, "supports_batching", True):
        return False
    layers = getattr(cache, "layers", None)
    if layers is None or len(layers) < session.end:
        return False
    return all(type(layers[i]) is DynamicLayer for i in range(session.start, session.end))


def batch_key(span: SpanModel, work: StepWork) -> tuple:
    """Steps that can share one forward: same span object, same blocks, same new-token count."""
    return id(span), work.session.start, work.session.end, work.new_tokens


@torch.inference_mode()
def step_batched(span: SpanModel, works: list[StepWork]) -> list[torch.Tensor]:
    """Run every work's step in one forward; returns each one's output [b_i, n, H].

    Sessions are only written to once the forward has succeeded: if it raises, every session is
    as it was, and the caller may run the steps one by one instead.
    """
    if len(works) == 1:
        work = works[0]
        return [span.step(work.session, work.hidden, work.mask)]
    _check_same_shape(works)
    start, end, n = works[0].session.start, works[0].session.end, works[0].new_tokens
    lengths = [w.session.seen_tokens for w in works]
    longest = max(lengths)
    full_masks = [_full_mask(span, w) for w in works]
    stacked_mask = torch.cat([_pad_left(m, longest + n, dim=1) for m in full_masks])
    positions = positions_from_mask(stacked_mask)[:, -n:]
    cache = DynamicCache(config=span.config)
    for index in range(start, end):
        _stack_layer(cache.layers[index], [w.session.cache.layers[index] for w in works], [w.rows for w in works],
                     lengths, longest)
    hidden = torch.cat([w.hidden.to(span.device, span.dtype) for w in works])
    blocks = span.blocks[start - span.start: end - span.start]
    out = span.family.run_blocks(span.context, blocks, start, hidden, stacked_mask, positions, cache)
    return _split(works, cache, out, full_masks, lengths, longest, start, end)


def _check_same_shape(works: list[StepWork]) -> None:
    first = works[0]
    for work in works[1:]:
        if (work.session.start, work.session.end, work.new_tokens) != (first.session.start, first.session.end,
                                                                       first.new_tokens):
            raise ValueError("a batched step needs the same blocks and the same number of new tokens")


def _full_mask(span: SpanModel, work: StepWork) -> torch.Tensor:
    mask = work.mask.to(span.device, torch.long)
    past = work.session.attention_mask
    return mask if past is None else torch.cat([past, mask], dim=1)


def _pad_left(tensor: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    missing = length - tensor.shape[dim]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


def _stack_layer(target: DynamicLayer, layers: list[DynamicLayer], rows: list[int], lengths: list[int],
                 longest: int) -> None:
    """Fill `target` with the sessions' KV, each left-padded with zeros to `longest` tokens."""
    if longest == 0:
        return  # nobody has a past yet: the layer initialises itself on its first update
    reference = next(layer for layer, length in zip(layers, lengths) if length > 0)
    stacked = []
    for name in ("keys", "values"):
        like = getattr(reference, name)
        parts = []
        for layer, count, length in zip(layers, rows, lengths):
            if length > 0:
                parts.append(_pad_left(getattr(layer, name), longest, dim=-2))
            else:  # a session with no past yet (its first step): all padding
                parts.append(like.new_zeros((count, *like.shape[1:-2], longest, like.shape[-1])))
        stacked.append(torch.cat(parts))
    target.lazy_initialization(stacked[0], stacked[1])
    target.keys, target.values = stacked


def _split(works, cache, out, full_masks, lengths, longest, start, end) -> list[torch.Tensor]:
    """Hand each session its rows of the output and of the new KV (padding dropped), and its mask."""
    outputs, row = [], 0
    total = longest + works[0].new_tokens
    for work, full_mask, length in zip(works, full_masks, lengths):
        rows = slice(row, row + work.rows)
        row += work.rows
        session = work.session
        outputs.append(out[rows])
        if session.cache is None:
            continue  # closed while the forward ran: nothing to keep
        keep = length + work.new_tokens
        for index in range(start, end):
            source, layer = cache.layers[index], session.cache.layers[index]
            # a copy, never a view: a view would keep the whole stacked tensor (everyone's KV) alive
            keys, values = (t[rows, ..., total - keep:, :].clone() for t in (source.keys, source.values))
            if not layer.is_initialized:
                layer.lazy_initialization(keys, values)
            layer.keys, layer.values = keys, values
        session.attention_mask = full_mask
        session.steps += 1
    return outputs
