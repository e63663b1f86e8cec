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
a member stepping alone or with a prompt chunk, a member closed (`SpanSession.close`: at once, or
right after the forward running on it). After each forward it is also dissolved when a row is
padded past its session's reserved length (the peer's KV budget counts reservations, so a stack
never holds more than its members reserved) or the padding outweighs what it keeps.

Failures change nobody: a stack is built completely before the sessions' own caches are emptied,
a forward that raises is rolled back, and a dissolve copies a member's rows before it touches it.
Threads: forwards may run in a worker thread while the event loop closes sessions; the batch's
lock serialises the forward and dissolving.
"""

from __future__ import annotations

import threading
import weakref
from typing import TYPE_CHECKING

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

if TYPE_CHECKING:
    from molink.peer.span import SpanModel, SpanSession

PADDING_SLACK_TOKENS = 64  # per row: padding this small is never worth a dissolve


class StackGone(RuntimeError):
    """The stack was dissolved (a member closed) between choosing it and stepping it: run alone."""


class StackedBatch:
    """Sessions [members] whose KV of blocks [start, end) lives stacked in `cache`, rows in member order.

    `_lock` is held by the forward (scheduler worker, maybe a thread) and by `dissolve`; a member
    closing on the event loop dissolves the stack at once if no forward holds it, else flags it
    for the worker to dissolve right after its forward: closed members' rows never outlive that.
    """

    def __init__(self, span: "SpanModel", sessions: list["SpanSession"], rows: list[int]):
        self.start, self.end = sessions[0].start, sessions[0].end
        caches = [s.cache for s in sessions]  # read once: the event loop may close a session meanwhile
        if any(cache is None for cache in caches):
            raise StackGone("a session was closed")
        self.rows: dict[int, slice] = {}
        self.lengths: dict[int, int] = {}  # each member's own tokens (its padding not counted)
        self.limits: dict[int, int | None] = {}  # each member's reserved length (session.max_length)
        row = 0
        for session, count in zip(sessions, rows):
            self.rows[id(session)] = slice(row, row + count)
            self.lengths[id(session)] = session.seen_tokens
            self.limits[id(session)] = session.max_length
            row += count
        self.total_rows = row
        self.width = max(self.lengths.values())  # tokens per row, padding included
        mask = torch.cat([_pad_left(_own_mask(s, count, span), self.width, dim=1) for s, count in zip(sessions, rows)])
        cache = DynamicCache(config=span.config)
        for index in range(self.start, self.end):  # every stacked layer first: a failure here changes nobody
            _stack_layer(cache.layers[index], [c.layers[index] for c in caches], rows,
                         list(self.lengths.values()), self.width)
        self.mask, self.cache = mask, cache
        self.members = [weakref.ref(s) for s in sessions]
        self.member_ids = {id(s) for s in sessions}
        self.broken = False  # a member left: dissolve, never step again
        self._lock = threading.Lock()
        for session, own in zip(sessions, caches):
            for index in range(self.start, self.end):
                own.layers[index].reset()  # the stacked copy is the only one now
            session.stacked = self
            session.own_mask = None  # after `stacked`: a reader on the event loop never sees neither

    # ------------------------------------------------------------------ membership

    def holds_exactly(self, sessions: list["SpanSession"]) -> bool:
        """Are these sessions, in any order, all of this batch's members (and nothing else)?"""
        if self.broken or len(sessions) != len(self.members):
            return False
        return {id(s) for s in sessions} == self.member_ids and all(s.stacked is self for s in sessions)

    def leave(self, session: "SpanSession") -> None:
        """A member closes (event loop): the stack goes now, or right after the forward holding it."""
        session.stacked = None
        self.broken = True
        if self._lock.acquire(blocking=False):
            try:
                self._dissolve()
            finally:
                self._lock.release()

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
        with self._lock:
            if self.cache is None or self.broken:
                raise StackGone("a member closed: the stack was dissolved")
            order = sorted(range(len(sessions)), key=lambda i: self.rows[id(sessions[i])].start)
            n = hiddens[0].shape[1]
            hidden = torch.cat([hiddens[i].to(span.device, span.dtype) for i in order])
            new_mask = torch.cat([masks[i].to(span.device, torch.long) for i in order])
            mask = torch.cat([self.mask, new_mask], dim=1)
            try:
                out = span.run(self.start, self.end, hidden, mask, self.cache)
            except BaseException:
                self._roll_back()
                raise
            self.mask, self.width = mask, self.width + n
            for session in sessions:
                self.lengths[id(session)] += n
                session.steps += 1
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
        """Hold the stack between steps only while no row is padded past what its session reserved
        (the peer's KV budget counts reservations) and the padding is small (see the module doc)."""
        if self.broken:
            return False
        if any(limit is not None and self.width > limit for limit in self.limits.values()):
            return False
        real = sum((self.rows[key].stop - self.rows[key].start) * length for key, length in self.lengths.items())
        padding = self.total_rows * self.width - real
        return padding <= max(real, PADDING_SLACK_TOKENS * self.total_rows)

    # ------------------------------------------------------------------ back to separate caches

    def dissolve(self) -> None:
        """Give every open member its own cache and mask back (copies: a view would pin everyone's KV)."""
        with self._lock:
            self._dissolve()

    def _dissolve(self) -> None:
        if self.cache is None:
            return
        for ref in self.members:
            session = ref()
            if session is None or session.stacked is not self:
                continue
            cache = session.cache  # read once: the event loop may close it meanwhile
            if cache is None:
                session.stacked = None
                continue
            rows, length = self.rows[id(session)], self.lengths[id(session)]
            own_mask = None if length == 0 else self.mask[rows, self.width - length:].clone()
            copies = [] if length == 0 else [
                tuple(t[rows, ..., self.width - length:, :].clone() for t in (self.cache.layers[i].keys,
                                                                                self.cache.layers[i].values))
                for i in range(self.start, self.end)]  # all copied before anything changes
            for index, (keys, values) in zip(range(self.start, self.end), copies):
                layer = cache.layers[index]
                if not layer.is_initialized:
                    layer.lazy_initialization(keys, values)
                layer.keys, layer.values = keys, values
            session.attention_mask = own_mask
            session.stacked = None  # after its own KV and mask are back (seen_tokens may be read meanwhile)
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
