"""One generate call's batch as k micro-batches in flight at once, merged into what one batch gives.

Rows of a batch never interact (each has its own mask, positions and cache rows), so rows
[a, b) can be a session of their own. k such sessions on the route pipeline: while peer 2
computes micro-batch 1's step, peer 1 computes micro-batch 2's, and the client's head and
sampling for one overlap the peers' work on the others. How many: pipeline_cost.py.

The merged output is exactly transformers' batched `generate`: every row keeps the prompt width
of the whole batch (its left padding included), and a micro-batch whose rows all finished early
stopped early, so its rows are right-padded with the pad token, as transformers pads finished
rows while the rest of the batch goes on. Only greedy decoding is split: transformers draws one
`torch.multinomial` over the whole batch per step, and micro-batches drawing separately (at
different moments, by design) would not give its samples.
"""

from __future__ import annotations

import torch
import trio
from transformers import GenerationConfig

from molink.swarm.generation import _eos_and_pad, generate_with_chain
from molink.swarm.pipeline_cost import MAX_MICRO_BATCHES, choose_micro_batches, route_costs

AUTO = "auto"
CLOSE_TIMEOUT = 5.0  # a sibling's chain being torn down after a failure still gets this long


def row_groups(batch: int, k: int) -> list[slice]:
    """k near-equal contiguous row ranges, the larger ones first."""
    base, extra = divmod(batch, k)
    groups, start = [], 0
    for i in range(k):
        size = base + (1 if i < extra else 0)
        groups.append(slice(start, start + size))
        start += size
    return groups


def merge_outputs(outputs: list[torch.Tensor], pad: int | None) -> torch.Tensor:
    """Stack the micro-batches' outputs row-wise; shorter ones (all rows finished early) padded right."""
    width = max(out.shape[1] for out in outputs)
    if any(out.shape[1] < width for out in outputs) and pad is None:
        raise ValueError("micro-batches finished at different lengths but there is no pad token")
    padded = [torch.nn.functional.pad(out, (0, width - out.shape[1]), value=pad) if out.shape[1] < width else out
              for out in outputs]
    return torch.cat(padded, dim=0)


def check_setting(setting) -> None:
    if setting == AUTO:
        return
    if isinstance(setting, bool) or not isinstance(setting, int) or setting < 1:
        raise ValueError(f"micro_batches must be 'auto' or an int >= 1, not {setting!r}")


async def micro_batch_count(model, setting, batch: int, max_length: int, config: GenerationConfig,
                            streamer=None) -> int:
    """How many micro-batches this call runs as: 1 (unsplit), the given int, or the cost rule's choice."""
    check_setting(setting)
    if setting == AUTO:
        if batch < 2 or config.do_sample or streamer is not None:
            return 1
        route = await model.planned_route(batch, max_length)
        if not route:
            return 1  # spans in this process (or nothing known yet): nothing to overlap
        costs = route_costs(route, hidden_size=model.config.hidden_size,
                            head_seconds=model.head_batcher.step_seconds(1, model.config.hidden_size),
                            rtts=getattr(model, "rtts", {}), relay=getattr(model, "relay", False),
                            link_rate=model.link_rate)
        return choose_micro_batches(costs, batch, max_k=MAX_MICRO_BATCHES)
    k = min(setting, batch)
    if k > 1 and config.do_sample:
        raise ValueError("micro_batches > 1 works with greedy decoding only: transformers samples the whole "
                         "batch with one draw per step, which separate micro-batches cannot reproduce")
    if k > 1 and streamer is not None:
        raise ValueError("micro_batches > 1 cannot feed a streamer (it takes one batch's tokens per step)")
    return k


async def generate_in_micro_batches(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                                    config: GenerationConfig, k: int, max_length: int) -> torch.Tensor:
    """Rows split into k sessions run concurrently (each its own chain); outputs merged."""
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    groups = row_groups(input_ids.shape[0], k)
    outputs: list[torch.Tensor | None] = [None] * k

    async def one(index: int, rows: slice) -> None:
        chain = await model.open_chain(rows.stop - rows.start, max_length)
        try:
            outputs[index] = await generate_with_chain(model.head_batcher, chain, input_ids[rows],
                                                       attention_mask[rows], config)
        finally:
            # shielded: a sibling's failure cancels us, and our KV caches must still be freed
            with trio.CancelScope(shield=True, deadline=trio.current_time() + CLOSE_TIMEOUT):
                await chain.close()

    try:
        async with trio.open_nursery() as nursery:
            for index, rows in enumerate(groups):
                nursery.start_soon(one, index, rows)
    except BaseExceptionGroup as group:
        raise first_cause(group) from None
    return merge_outputs(outputs, _eos_and_pad(config)[1])


def first_cause(group: BaseExceptionGroup) -> BaseException:
    """What failed first among the micro-batches, not the cancellations that followed (an unsplit
    generate raises a plain InferenceError; callers should see the same)."""
    leaves = []
    pending = [group]
    while pending:
        exc = pending.pop(0)
        if isinstance(exc, BaseExceptionGroup):
            pending.extend(exc.exceptions)
        else:
            leaves.append(exc)
    real = [exc for exc in leaves if not isinstance(exc, trio.Cancelled)]
    return (real or leaves)[0]
