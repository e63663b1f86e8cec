"""The per-step fast paths of a peer and a client (issue #7): same answers as the slow paths.

- A step's input checks (protocol.decode_step_tensors) run in Python / numpy for small tensors and
  in torch for large ones: both refuse exactly what the torch checks refused.
- The scheduler's inline-or-thread decision predicts a batched decode forward as flat in its rows
  up to BLOCKS_CURVE's free rows (what a decode forward costs on CPU), and a prompt chunk as growing with tokens;
  its one-row cost follows the forwards the peer runs, not only the throughput measured at start.
- A lone session's cheap decode step runs in its submitter's task (no hand-off to the worker and
  back); once another session is active, steps meet at the worker again, where they can batch.
- tune_gc spaces young collections out, once, never lowering a larger threshold, and can be off.
"""

from __future__ import annotations

import gc

import pytest
import torch
import trio
import trio.testing

from molink.dht.wire import encode_tensor
from molink.peer import protocol as p
from molink.peer import scheduler as s
from molink.peer.batched_span import StepWork
from molink.peer.cost_curve import BLOCKS_CURVE, ForwardCost
from molink.peer.scheduler import BatchingConfig
from molink.peer.span import SpanModel

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
    blocks, cost = 2, ForwardCost(throughput=2000.0)  # 1 ms per one-row forward
    one = cost.predict(1, blocks)
    assert one == pytest.approx(0.001)
    assert cost.predict(BLOCKS_CURVE.free_rows, blocks) == one  # a decode batch reads the weights once
    assert cost.predict(BLOCKS_CURVE.free_rows + BLOCKS_CURVE.rows_per_extra, blocks) == pytest.approx(2 * one)
    assert cost.predict(128, blocks) > s.INLINE_COMPUTE_SECONDS  # a prompt chunk: threaded


def test_forward_cost_follows_the_forwards_run_not_a_start_measure_taken_under_load():
    """Peers starting side by side measured each other's loading: the first guess said 2.4 ms for a
    forward that takes 1.2, so every step paid a thread hand-off. What the forwards take wins."""
    cost = ForwardCost(throughput=800.0, samples=8)  # 1.25 ms per block: 2 blocks predicted 2.5 ms
    assert cost.predict(1, 2) > s.INLINE_COMPUTE_SECONDS
    for _ in range(4):
        cost.observe(rows=1, blocks=2, seconds=0.0012)
        cost.observe(rows=16, blocks=2, seconds=0.0012 * BLOCKS_CURVE.factor(16))  # scaled back to one row
    assert cost.predict(1, 2) == pytest.approx(0.0012)
    cost.observe(rows=1, blocks=2, seconds=0.5)  # one stalled forward (another process woke) moves nothing
    assert cost.predict(1, 2) == pytest.approx(0.0012)
    for _ in range(8):  # the machine really got slower: the estimate follows within `samples` forwards
        cost.observe(rows=1, blocks=2, seconds=0.004)
    assert cost.predict(1, 2) == pytest.approx(0.004)
    assert ForwardCost().predict(1, 2) is None  # nothing measured, nothing run: no guess (forwards threaded)
    ForwardCost().observe(rows=0, blocks=2, seconds=0.1)  # nothing to learn from an empty forward


async def test_the_scheduler_runs_a_forward_inline_once_its_real_cost_is_known(tiny_llama, monkeypatch):
    """A start measure taken under load (2 block-steps/s: 1 s for two blocks) first threads the
    forward; the forwards' own timing then brings it onto the event loop (same thread as the caller).
    The bound is raised to 50 ms so that a loaded test machine's slow forwards still count as tiny."""
    import threading

    monkeypatch.setattr(s, "INLINE_COMPUTE_SECONDS", 0.05)
    span = SpanModel.load(tiny_llama, 0, 2)
    scheduler = s.StepScheduler(BatchingConfig(window=0.0), throughput=2.0)
    threads = []
    original = span.step

    def step(*args, **kwargs):
        threads.append(threading.get_ident())
        return original(*args, **kwargs)

    span.step = step
    session = span.new_session()
    hidden = torch.randn(1, 1, span.config.hidden_size)
    async with trio.open_nursery() as nursery:
        await nursery.start(scheduler.run)
        for _ in range(5):  # the first forward warms up (several ms): the median needs a few more
            await scheduler.submit(span, StepWork(session, hidden, torch.ones(1, 1, dtype=torch.long)))
        nursery.cancel_scope.cancel()
    loop_thread = threading.get_ident()
    assert threads[0] != loop_thread  # the first guess: too slow for the loop
    assert threads[-1] == loop_thread  # what the forward really took: well under INLINE_COMPUTE_SECONDS
    assert scheduler.cost.predict(1, 2) < s.INLINE_COMPUTE_SECONDS


async def test_a_lone_sessions_step_runs_in_its_own_task_and_others_meet_at_the_worker(tiny_llama, monkeypatch):
    monkeypatch.setattr(s, "INLINE_COMPUTE_SECONDS", 0.05)  # a loaded test machine's forwards still count as cheap
    span = SpanModel.load(tiny_llama, 0, 2)
    scheduler = s.StepScheduler(BatchingConfig(window=0.0), throughput=1e6)  # known to be cheap from the start
    ran_in = []
    original = span.step

    def step(*args, **kwargs):
        ran_in.append(trio.lowlevel.current_task())
        return original(*args, **kwargs)

    span.step = step
    lone, other, reference = span.new_session(), span.new_session(), span.new_session()
    inputs = [torch.randn(1, 1, span.config.hidden_size) for _ in range(3)]
    one = torch.ones(1, 1, dtype=torch.long)
    async with trio.open_nursery() as nursery:
        await nursery.start(scheduler.run)
        await trio.testing.wait_all_tasks_blocked()  # the worker is parked, waiting for work
        outputs = [await scheduler.submit(span, StepWork(lone, hidden, one)) for hidden in inputs[:2]]
        assert ran_in == [trio.lowlevel.current_task()] * 2
        # another session steps: from now on both are expected, so their steps go to the worker
        await scheduler.submit(span, StepWork(other, inputs[0], one))
        outputs.append(await scheduler.submit(span, StepWork(lone, inputs[2], one)))
        assert trio.lowlevel.current_task() not in ran_in[2:]
        nursery.cancel_scope.cancel()
    expected = [original(reference, hidden, one) for hidden in inputs]
    assert all(torch.equal(got, want) for got, want in zip(outputs, expected))  # same forward, same bits
    assert scheduler.stats.decode_forwards == 4


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
