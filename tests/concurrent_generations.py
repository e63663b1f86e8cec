"""Several generations at once from one client, on its event loop (what an endpoint serving many
users does): shared by the batching, head-batching and step-bundle tests."""

from __future__ import annotations

import torch
import trio


def generate_all_at_once(model, prompts: list[torch.Tensor], config) -> list[torch.Tensor]:
    """Every prompt as its own generation, all started together; outputs in prompt order."""

    async def all_at_once():
        results = {}
        async with trio.open_nursery() as nursery:
            for index, ids in enumerate(prompts):
                async def one(index=index, ids=ids):
                    results[index] = await model.generate_async(ids, None, config)
                nursery.start_soon(one)
        return [results[i] for i in range(len(prompts))]

    return model._run(all_at_once)
