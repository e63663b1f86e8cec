"""The per-step fast paths of a peer and a client (issue #7): same answers as the slow paths.

- A step's input checks (protocol.decode_step_tensors) run in Python / numpy for small tensors and
  in torch for large ones: both refuse exactly what the torch checks refused.
- The scheduler's inline-or-thread decision predicts a batched decode forward as flat in its rows
  up to BLOCKS_CURVE's free rows (what a decode forward costs on CPU), and a prompt chunk as growing with tokens.
- tune_gc spaces young collections out, once, never lowering a larger threshold, and can be off.
"""

from __future__ import annotations

import gc

import pytest
import torch

from molink.dht.wire import encode_tensor
from molink.peer import protocol as p
from molink.peer import scheduler as s

HIDDEN = 8


def body(hidden: torch.Tensor, mask: torch.Tensor) -> dict:
    return {"hidden": encode_tensor(hidden, codec="raw"), "mask": encode_tensor(mask, codec="raw")}


def check(hidden: torch.Tensor, mask: torch.Tensor):
    return p.decode_step_tensors(body(hidden, mask), p.PEER_WIRE_LIMITS, HIDDEN, hidden.shape[0], 10_000)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1, 5000])  # below and above SMALL_CHECK elements
def test_step_checks_refuse_non_finite_hidden_states(dtype, tokens):
    hidden = torch.randn(1, tokens, HIDDEN).to(dtype)
    mask = torch.ones(1, tokens, dtype=torch.long)
    got, got_mask = check(hidden, mask)
    assert torch.equal(got, hidden) and torch.equal(got_mask, mask)
    for bad in (float("nan"), float("inf"), float("-inf")):
        poisoned = hidden.clone()
        poisoned[0, tokens - 1, HIDDEN - 1] = bad
        with pytest.raises(p.ProtocolError, match="NaN or inf"):
            check(poisoned, mask)


@pytest.mark.parametrize("tokens", [1, 7, 5000])
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool])
def test_step_checks_take_zero_one_masks_and_refuse_others(tokens, dtype):
    hidden = torch.zeros(1, tokens, HIDDEN)
    mask = torch.ones(1, tokens, dtype=torch.long)
    mask[0, 0] = 0
    _, got = check(hidden, mask.to(dtype))
    assert got.dtype == torch.long and torch.equal(got, mask)
    if dtype is torch.bool:
        return  # a bool cannot hold anything else
    for bad in ([2, 255] if dtype is torch.uint8 else [2, -1]):
        wrong = mask.clone()
        wrong[0, tokens - 1] = bad
        with pytest.raises(p.ProtocolError, match="0 or 1"):
            check(hidden, wrong.to(dtype))


def test_inline_prediction_is_flat_for_decode_batches_and_grows_with_prompt_tokens():
    blocks, throughput = 2, 2000.0  # 1 ms per one-row forward
    one = s.forward_seconds(1, blocks, throughput)
    assert one == pytest.approx(0.001)
    assert s.forward_seconds(s.BLOCKS_CURVE.free_rows, blocks, throughput) == one  # a decode batch reads the weights once
    assert s.forward_seconds(s.BLOCKS_CURVE.free_rows + s.BLOCKS_CURVE.rows_per_extra, blocks, throughput) == pytest.approx(2 * one)
    assert s.forward_seconds(128, blocks, throughput) > s.INLINE_COMPUTE_SECONDS  # a prompt chunk: threaded


def test_tune_gc_raises_the_young_threshold_once_and_can_be_off(monkeypatch):
    saved = gc.get_threshold()
    try:
        gc.set_threshold(700, 10, 10)
        monkeypatch.setenv("MOLINK_GC_TUNING", "0")
        s.tune_gc()
        assert gc.get_threshold() == (700, 10, 10)
        monkeypatch.delenv("MOLINK_GC_TUNING")
        s.tune_gc()
        s.tune_gc()
        assert gc.get_threshold() == (s.YOUNG_THRESHOLD, 10, 10)
        gc.set_threshold(10 * s.YOUNG_THRESHOLD, 10, 10)  # someone else's larger choice stays
        s.tune_gc()
        assert gc.get_threshold() == (10 * s.YOUNG_THRESHOLD, 10, 10)
        gc.set_threshold(0, 10, 10)  # collection turned off stays off
        s.tune_gc()
        assert gc.get_threshold()[0] == 0
    finally:
        gc.set_threshold(*saved)
