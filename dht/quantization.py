"""8-bit blockwise quantization: the arithmetic behind the wire's opt-in lossy codec "q8".

The flattened tensor is cut into blocks of `block` consecutive values. For hidden states
[batch, tokens, hidden] with `hidden` a multiple of the block (576 = 9 x 64 for SmolLM2, as for
nearly every model) each block lies inside one token's vector, along the last dim.
Each block keeps one float32 scale = absmax / 127 and int8 values round(x / scale) in
[-127, 127] (-128 is never produced: the range stays symmetric). Per value the error is at most
scale / 2 = absmax / 254 of its block, plus the rounding back to the original dtype.

Why float32 scales (4 bytes per 64 values, 6 % on top of the int8s; fp16 would be 3 %):
fp16 scales underflow for blocks of small values and overflow for bf16/fp32 activations
above ~8e6; one robust format is worth 3 % of a payload already ~4x smaller than fp32.

No validation here: `molink.dht.wire` checks every size, value and scale from the network
before calling `dequantize_blockwise`.
"""

from __future__ import annotations

import torch

Q8_BLOCK = 64
Q8_MAX_ABS = 127


def block_count(numel: int, block: int) -> int:
    return -(-numel // block)


def quantize_blockwise(tensor: torch.Tensor, block: int = Q8_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 values [numel], float32 scales [blocks]) on the CPU; the math runs where the tensor is.

    The caller guarantees finite values (an inf would make its block's scale inf)."""
    flat = tensor.detach().reshape(-1).to(torch.float32)
    numel = flat.numel()
    padded = torch.nn.functional.pad(flat, (0, block_count(numel, block) * block - numel))
    blocks = padded.view(-1, block)
    scales = blocks.abs().amax(dim=1) / Q8_MAX_ABS
    # an all-zero block has scale 0: divide by 1 instead, its values are 0 either way
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))
    values = (blocks / safe[:, None]).round_().clamp_(-Q8_MAX_ABS, Q8_MAX_ABS).to(torch.int8)
    return values.reshape(-1)[:numel].cpu(), scales.cpu()


def dequantize_blockwise(values: torch.Tensor, scales: torch.Tensor, block: int) -> torch.Tensor:
    """float32 [numel] from int8 values [numel] and float32 scales [block_count(numel, block)]."""
    numel = values.numel()
    padded = torch.nn.functional.pad(values.to(torch.float32), (0, scales.numel() * block - numel))
    return (padded.view(-1, block) * scales[:, None]).reshape(-1)[:numel]
