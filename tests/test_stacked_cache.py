"""Sessions batched together keep their KV stacked between forwards (peer/stacked_cache.py).

The stacked path must give bitwise what restacking every step gives (the same layout, the same
ops), and every way out of a stack (a member stepping alone, a member closing, a failed forward,
too much padding) must leave each session exactly where it would be without stacking.
"""

from __future__ import annotations

import pytest
import torch

import molink.peer.batched_span as batched_span
from molink.peer.batched_span import StepWork, step_batched
from molink.peer.scheduler import SchedulerStats
from molink.swarm.model import LocalSpansModelForCausalLM

HIDDEN = 64  # tiny_llama's hidden size
ONE = torch.ones(1, 1, dtype=torch.long)


@pytest.fixture
def span(tiny_llama):
    return LocalSpansModelForCausalLM.from_pretrained(tiny_llama, [(0, 6)], progress=False).spans[0]


def inputs(seed: int, tokens: int) -> torch.Tensor:
    return torch.randn(1, tokens, HIDDEN, generator=torch.Generator().manual_seed(seed))


def sessions_after_prompts(span, lengths):
    """Sessions that have each run a prompt of their length alone (their own caches)."""
    sessions = [span.new_session() for _ in lengths]
    for index, (session, length) in enumerate(zip(sessions, lengths)):
        span.step(session, inputs(100 + index, length), torch.ones(1, length, dtype=torch.long))
    return sessions


def decode(span, sessions, step: int, stats=None) -> list[torch.Tensor]:
    works = [StepWork(s, inputs(1000 * step + i, 1), ONE) for i, s in enumerate(sessions)]
    return step_batched(span, works, stats)


def decode_alone(span, sessions, step: int) -> list[torch.Tensor]:
    return [span.step(s, inputs(1000 * step + i, 1), ONE) for i, s in enumerate(sessions)]


LENGTHS = [5, 12, 9, 3]


def test_the_same_sessions_stay_stacked_and_give_bitwise_what_restacking_gives(span, monkeypatch):
    kept, restacked, alone = (sessions_after_prompts(span, LENGTHS) for _ in range(3))
    stats = SchedulerStats()
    for step in range(5):
        with monkeypatch.context() as patch:
            patch.setattr(batched_span, "KEEP_STACKED", False)
            want = decode(span, restacked, step)
        got = decode(span, kept, step, stats)
        reference = decode_alone(span, alone, step)
        for g, w, r in zip(got, want, reference):
            assert torch.equal(g, w)  # the same layout and ops: not merely close
            assert torch.allclose(g, r, rtol=1e-4, atol=1e-4)
        batch = kept[0].stacked
        assert batch is not None and all(s.stacked is batch for s in kept)
        assert all(s.stacked is None for s in restacked)
    assert (stats.stacks_built, stats.stacks_reused) == (1, 4)
    assert [s.seen_tokens for s in kept] == [length + 5 for length in LENGTHS]
    for got, want in zip(kept, alone):
        assert torch.equal(got.attention_mask, want.attention_mask)


def test_a_member_stepping_alone_takes_its_cache_back_and_the_others_go_on(span):
    stacked, alone = sessions_after_prompts(span, LENGTHS), sessions_after_prompts(span, LENGTHS)
    for step in range(3):
        decode(span, stacked, step)
        decode_alone(span, alone, step)
    chunk, mask = inputs(7, 2), torch.ones(1, 2, dtype=torch.long)
    got = span.step(stacked[1], chunk, mask)  # e.g. more prompt for one session: not a decode step
    assert torch.allclose(got, span.step(alone[1], chunk, mask), rtol=1e-4, atol=1e-4)
    assert all(s.stacked is None for s in stacked)  # the batch gave everyone their own cache back
    assert [s.seen_tokens for s in stacked] == [s.seen_tokens for s in alone]
    for step in range(3, 6):
        for got, want in zip(decode(span, stacked, step), decode_alone(span, alone, step)):
            assert torch.allclose(got, want, rtol=1e-4, atol=1e-4)


def test_a_closed_member_frees_the_stack_at_once_and_the_others_go_on(span):
    stacked, alone = sessions_after_prompts(span, LENGTHS), sessions_after_prompts(span, LENGTHS)
    decode(span, stacked, 0)
    decode_alone(span, alone, 0)
    old_batch = stacked[0].stacked
    stacked[2].close()  # the registry closing it on the event loop; no forward holds the stack
    assert stacked[2].cache is None and old_batch.cache is None  # its rows are not pinned by the others
    assert all(s.stacked is None for s in stacked)
    survivors, their_alone = stacked[:2] + stacked[3:], alone[:2] + alone[3:]
    for got, want in zip(decode(span, survivors, 1), decode_alone(span, their_alone, 1)):
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-4)
    assert survivors[0].stacked.total_rows == 3


def test_a_member_closing_during_the_forward_is_dropped_right_after_it(span, monkeypatch):
    stacked = sessions_after_prompts(span, LENGTHS)
    decode(span, stacked, 0)
    batch, first_block = stacked[0].stacked, span.blocks[0]
    forward = first_block.forward

    def close_meanwhile(*args, **kwargs):  # the event loop closes a session while a thread computes
        stacked[1].close()
        return forward(*args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(first_block, "forward", close_meanwhile)
        decode(span, stacked, 1)
    assert batch.cache is None and all(s.stacked is None for s in stacked)
    assert [s.seen_tokens for i, s in enumerate(stacked) if i != 1] == [LENGTHS[i] + 2 for i in (0, 2, 3)]


def test_a_failure_while_stacking_changes_nobody(span, monkeypatch):
    import molink.peer.stacked_cache as stacked_cache

    sessions, alone = sessions_after_prompts(span, LENGTHS), sessions_after_prompts(span, LENGTHS)
    calls, real = [], stacked_cache._stack_layer

    def fail_third(*args):
        calls.append(1)
        if len(calls) == 3:
            raise MemoryError("no room for the stack")
        return real(*args)

    with monkeypatch.context() as patch:
        patch.setattr(stacked_cache, "_stack_layer", fail_third)
        with pytest.raises(MemoryError):
            decode(span, sessions, 0)
    assert all(s.stacked is None for s in sessions)
    for got, want in zip(decode_alone(span, sessions, 0), decode_alone(span, alone, 0)):
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-4)


def test_a_stack_never_pads_a_row_past_what_its_session_reserved(span):
    roomy, short = sessions_after_prompts(span, [40, 30, 30]), sessions_after_prompts(span, [40, 30, 30])
    for session in roomy + short:
        session.max_length = 64
    short[1].max_length = 35  # a session that asked for a short cache: 41 wide would pin more than that
    decode(span, roomy, 0)
    decode(span, short, 0)
    assert roomy[0].stacked is not None  # 41 tokens wide: within every reservation
    assert all(s.stacked is None for s in short)


def test_a_failed_forward_leaves_the_stacked_sessions_as_they_were(span, monkeypatch):
    stacked, alone = sessions_after_prompts(span, LENGTHS), sessions_after_prompts(span, LENGTHS)
    for step in range(2):
        decode(span, stacked, step)
        decode_alone(span, alone, step)
    seen = [s.seen_tokens for s in stacked]
    last_block = span.blocks[-1]
    with monkeypatch.context() as patch:  # the blocks before it have already appended their KV
        patch.setattr(last_block, "forward", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))
        with pytest.raises(RuntimeError, match="boom"):
            decode(span, stacked, 2)
    assert [s.seen_tokens for s in stacked] == seen
    for step in range(2, 5):  # the failed step is retried, as the scheduler does one by one
        for got, want in zip(decode(span, stacked, step), decode_alone(span, alone, step)):
            assert torch.allclose(got, want, rtol=1e-4, atol=1e-4)


def test_a_long_session_among_short_ones_is_not_kept_padded(span):
    uneven = sessions_after_prompts(span, [200, 3, 3, 3])
    decode(span, uneven, 0)
    assert all(s.stacked is None for s in uneven)  # 3 rows x ~200 tokens of padding: not held
    even = sessions_after_prompts(span, [20, 18, 25])
    decode(span, even, 0)
    assert even[0].stacked is not None


def test_sessions_without_a_past_stack_and_stay_exact(span):
    fresh, alone = [span.new_session() for _ in range(3)], [span.new_session() for _ in range(3)]
    for step in range(3):
        for got, want in zip(decode(span, fresh, step), decode_alone(span, alone, step)):
            assert torch.allclose(got, want, rtol=1e-4, atol=1e-4)
    assert fresh[0].stacked is not None and [s.seen_tokens for s in fresh] == [3, 3, 3]
