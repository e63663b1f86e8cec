"""Several sessions' steps through one span as ONE forward (continuous batching on a peer).

The sessions' KV caches are stacked the way transformers runs a left-padded batch
(stacked_cache.py builds and keeps that layout):

- every session's KV of every block is left-padded with zeros to the longest session (L) and the
  sessions are stacked along the batch axis, in one `DynamicCache`;
- the 2-D 0/1 mask of each session (its own padding included) is left-padded with zeros, so the
  family's own mask builder masks the padding out, and positions (derived from the mask with a
  cumulative sum) are each row's own: leading zeros do not change a cumsum;
- the family's `run_blocks` runs once over the stacked hidden states;
- the sessions stay stacked for their next forward together; any other use of one of them gives
  each its own rows of the KV back, without the padding.

Masked keys get exactly zero attention weight, rotary/ALiBi see each row's own positions, and
every other op is per row, so each session gets what it would get alone up to float rounding
(different matmul shapes). tests/test_batching.py holds every family to that.

Supported when every block of the span caches into a plain `DynamicLayer` (full attention).
Sliding-window layers keep only the last W tokens with their own offsets, and other cache
layouts differ again: spans with those run their sessions one by one (`batchable` says which).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
from transformers.cache_utils import DynamicLayer

from molink.peer.span import SpanModel, SpanSession
from molink.peer.stacked_cache import StackedBatch

logger = logging.getLogger(__name__)

#: keep batched sessions' KV stacked between forwards (stacked_cache.py); 0 restacks every step
KEEP_STACKED = os.environ.get("MOLINK_STACKED_CACHE", "1") not in ("0", "off", "false")


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


def step_batched(span: SpanModel, works: list[StepWork], stats=None) -> list[torch.Tensor]:
    """Run every work's step in one forward; returns each one's output [b_i, n, H].

    The sessions stay stacked afterwards (stacked_cache.py) unless MOLINK_STACKED_CACHE=0 or the
    padding is not worth holding; the next forward of the same sessions reuses that stack. If
    the forward raises, every session is as it was, and the caller may run the steps one by one.
    `stats` (the scheduler's) counts stacks built and reused.
    """
    sessions = [work.session for work in works]
    if len(works) == 1:
        return [span.step(sessions[0], works[0].hidden, works[0].mask)]
    _check_same_shape(works)
    if len({id(session) for session in sessions}) != len(sessions):
        raise ValueError("a session can only take one step per forward")
    batch = sessions[0].stacked
    if batch is None or not batch.holds_exactly(sessions):
        for session in sessions:
            session.detach()
        batch = StackedBatch(span, sessions, [work.rows for work in works])
        if stats is not None:
            stats.stacks_built += 1
    elif stats is not None:
        stats.stacks_reused += 1
    outputs = batch.step(span, sessions, [work.hidden for work in works], [work.mask for work in works])
    if not KEEP_STACKED or not batch.worth_keeping():
        try:
            batch.dissolve()
        except Exception:  # noqa: BLE001 - the step itself succeeded: never report it failed (it would rerun)
            logger.warning("could not unstack %d sessions after their step; they stay stacked", len(works),
                           exc_info=True)
    return outputs


def _check_same_shape(works: list[StepWork]) -> None:
    first = works[0]
    for work in works[1:]:
        if (work.session.start, work.session.end, work.new_tokens) != (first.session.start, first.session.end,
                                                                       first.new_tokens):
            raise ValueError("a batched step needs the same blocks and the same number of new tokens")
