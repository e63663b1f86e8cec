"""Sessions batched together keep their KV stacked between steps (one tensor per layer for all).

Under load the same sessions share forward after forward: 32 users decoding at once make one
batch per step at every peer. Stacking their separate caches before each forward and splitting
them after copies every session's whole KV twice per step, per layer (at 32 tiny sessions that was
as much time as the forward itself). A `StackedBatch` keeps them in the stacked layout instead,
exactly as batched_span.py builds it (each session left-padded with zeros to the longest, rows in
a fixed order, the 2-D mask padded the same way), so the next forward of the same sessions starts
at once and each layer's `DynamicLayer.update` appends one column for all of them.

The layout is the one a fresh stack would build (everyone grows by the same n tokens, so the
padding does not change): outputs are bitwise what the stack-per-step path gives.

A batch lives while its members keep stepping together. Anything else dissolves it first, giving
every open member its own cache back (its rows, padding dropped): a different group of sessions,
a member stepping alone or with a prompt chunk, a member closed (`SpanSession.close`). A batch
whose padding would hold more than it keeps is dissolved right after its forward (a long session
among short ones would otherwise pin rows x longest of memory between steps).

Threads: forwards run one at a time (the scheduler's worker), which is where batches are built,
stepped and dissolved; `leave` (a session closing on the event loop meanwhile) only flags the batch.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from molink.peer.span import positions_from_mask

if TYPE_CHECKING:
    from molink.peer.span import SpanModel, SpanSession

PADDING_SLACK_TOKENS = 64  # per row: padding this small is never worth a dissolve


class StackedBatch:
    """Sessions [members] whose KV of blocks [start, end) lives stacked in `cache`, rows in member order."""

    def __init__(self, span: "SpanModel", sessions: list["SpanSession"], rows: list[int]):
        self.start, self.end = sessions[0].start, sessions[0].end
        self.members = [weakref.ref(s) for s in sessions]
        self.member_ids = {id(s) for s in sessions}
        self.rows: dict[int, slice] = {}
        self.lengths: dict[int, int] = {}  # each member's own tokens (its padding not counted)
        row = 0
        for session, count in zip(sessions, rows):
            self.rows[id(session)] = slice(row, row + count)
            self.lengths[id(session)] = session.seen_tokens
            row += count
        self.total_rows = row
        self.width = max(self.lengths.values())  # tokens per row, padding included
        self.mask = torch.cat([_pad_left(_own_mask(s, count, span), self.width, dim=1)
                               for s, count in zip(sessions, rows)])
        self.cache = DynamicCache(config=span.config)
        for index in range(self.start, self.end):
            layers = [s.cache.layers[index] for s in sessions]
            _stack_layer(self.cache.layers[index], layers, rows, list(self.lengths.values()), self.width)
            for layer in layers:
                layer.reset()  # the stacked copy is the only one now
        for session in sessions:
            session.stacked = self
            session.own_mask = None  # after `stacked`: a reader on the event loop never sees neither
        self.broken = False  # a member left: dissolve before the next forward

    # ------------------------------------------------------------------ membership

    def holds_exactly(self, sessions: list["SpanSession"]) -> bool:
        """Are these sessions, in any order, all of this batch's members (and nothing else)?"""
        if self.broken or len(sessions) != len(self.members):
            return False
        return {id(s) for s in sessions} == self.member_ids and all(s.stacked is self for s in sessions)

    def leave(self, session: "SpanSession") -> None:
        session.stacked = None
        self.broken = True

    def mask_of(self, session: "SpanSession") -> torch.Tensor | None:
        length = self.lengths[id(session)]
        if length == 0:
            return None
        return self.mask[self.rows[id(session)], self.width - length:]

    def seen_tokens(self, session: "SpanSession") -> int:
        return self.lengths[id(session)]

    # ------------------------------------------------------------------ one forward

    @torch.inference_mode()
    def step(self, span: "SpanModel", sessions: list["SpanSession"], hiddens: list[torch.Tensor],
             masks: list[torch.Tensor]) -> list[torch.Tensor]:
        """One forward of every member (`sessions` in any order, with their new hidden states and
        0/1 masks); returns each one's output. On failure the batch is as it was before."""
        order = sorted(range(len(sessions)), key=lambda i: self.rows[id(sessions[i])].start)
        n = hiddens[0].shape[1]
        hidden = torch.cat([hiddens[i].to(span.device, span.dtype) for i in order])
        new_mask = torch.cat([masks[i].to(span.device, torch.long) for i in order])
        mask = torch.cat([self.mask, new_mask], dim=1)
        positions = positions_from_mask(mask)[:, -n:]
        blocks = span.blocks[self.start - span.start: self.end - span.start]
        try:
            out = span.family.run_blocks(span.context, blocks, self.start, hidden, mask, positions, self.cache)
        except BaseException:
            self._roll_back()
            raise
        for session in sessions:
            self.lengths[id(session)] += n
            session.steps += 1
        self.mask, self.width = mask, self.width + n
        return [out[self.rows[id(s)]] for s in sessions]

    def _roll_back(self) -> None:
        """Drop what a failed forward appended (the blocks before the failure did update)."""
        for index in range(self.start, self.end):
            layer = self.cache.layers[index]
            if not layer.is_initialized:
                continue
            if self.width == 0:
                layer.reset()
            elif layer.keys.shape[-2] > self.width:
                layer.keys, layer.values = layer.keys[..., :self.width, :], layer.values[..., :self.width, :]

    def worth_keeping(self) -> bool:
        """Is the padding small enough to hold between steps? (See the module doc.)"""
        real = sum((self.rows[key].stop - self.rows[key].start) * length for key, length in self.lengths.items())
        padding = self.total_rows * self.width - real
        return padding <= max(real, PADDING_SLACK_TOKENS * self.total_rows)

    # ------------------------------------------------------------------ back to separate caches

    def dissolve(self) -> None:
        """Give every open member its own cache and mask back (copies: a view would pin everyone's KV)."""
        for ref in self.members:
            session = ref()
            if session is None or session.stacked is not self:
                continue
            if session.cache is None:
                session.stacked = None
                continue  # closed meanwhile
            rows, length = self.rows[id(session)], self.lengths[id(session)]
            session.attention_mask = None if length == 0 else self.mask[rows, self.width - length:].clone()
            session.stacked = None  # after its own mask is back (seen_tokens may be read meanwhile)
            if length == 0:
                continue
            for index in range(self.start, self.end):
                source, layer = self.cache.layers[index], session.cache.layers[index]
                keys, values = (t[rows, ..., self.width - length:, :].clone() for t in (source.keys, source.values))
                if not layer.is_initialized:
                    layer.lazy_initialization(keys, values)
                layer.keys, layer.values = keys, values
        self.members, self.member_ids, self.broken = [], set(), True
        self.cache = None


def _own_mask(session: "SpanSession", rows: int, span: "SpanModel") -> torch.Tensor:
    mask = session.attention_mask
    if mask is None:  # no past yet: an empty [rows, 0] mask, padded like any other
        return torch.zeros(rows, 0, dtype=torch.long, device=span.device)
    return mask.to(span.device, torch.long)


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
