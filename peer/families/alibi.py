"""ALiBi families: BLOOM, and Falcon where `config.alibi` is set (Falcon otherwise uses rotary).

ALiBi needs no weights: each block adds a per-head linear bias over the key positions, computed
from the session's whole 0/1 mask (past and new tokens), which every span holds. So, like rotary,
it is computed by each span, with the family's own `build_alibi_tensor`, at the same point of
the forward as the full model computes it.
"""

from __future__ import annotations

import math

import torch
from transformers.masking_utils import create_causal_mask

from molink.peer.families.common import modeling_class
from molink.peer.families.decoder import DecoderFamily


class BloomFamily(DecoderFamily):
    """BloomModel.forward: alibi from the 2-D mask, a causal mask, blocks(alibi=, layer_past=)."""

    def masks(self, config, kinds, first_block, hidden_states, attention_mask, position_ids, cache) -> dict:
        mask = create_causal_mask(config=config, inputs_embeds=hidden_states, attention_mask=attention_mask,
                                  cache=cache, layer_idx=first_block)
        return {"full_attention": mask}

    def block_inputs(self, context, kinds, hidden_states, attention_mask, position_ids) -> list[dict]:
        build_alibi_tensor = modeling_class("bloom", "build_alibi_tensor")
        alibi = build_alibi_tensor(attention_mask, context.config.n_head, dtype=hidden_states.dtype)
        return [dict(alibi=alibi) for _ in kinds]


class FalconFamily(DecoderFamily):
    """FalconModel.forward: the causal mask always materialized; with ALiBi, the bias folded into it."""

    def masks(self, config, kinds, first_block, hidden_states, attention_mask, position_ids, cache) -> dict:
        mask = create_causal_mask(config=config, inputs_embeds=hidden_states, attention_mask=attention_mask,
                                  cache=cache, position_ids=position_ids, layer_idx=first_block,
                                  allow_is_causal_skip=False)
        if config.alibi and mask is not None and mask.ndim == 4:
            batch_size = hidden_states.shape[0]
            min_dtype = torch.finfo(hidden_states.dtype).min
            if mask.dtype == torch.bool:
                mask = torch.where(mask, torch.full((), 0.0, device=mask.device, dtype=hidden_states.dtype),
                                   min_dtype)
            alibi = self._alibi(config, attention_mask, hidden_states)
            alibi = alibi.reshape(batch_size, -1, *alibi.shape[1:])
            mask = torch.masked_fill(alibi / math.sqrt(config.hidden_size // config.num_attention_heads),
                                     mask < -1, min_dtype)
        return {"full_attention": mask}

    def block_inputs(self, context, kinds, hidden_states, attention_mask, position_ids) -> list[dict]:
        config = context.config
        alibi = self._alibi(config, attention_mask, hidden_states) if config.alibi else None
        table = context.rotary_emb(hidden_states, position_ids=position_ids)
        return [dict(alibi=alibi, position_ids=position_ids, position_embeddings=table, output_attentions=False)
                for _ in kinds]

    @staticmethod
    def _alibi(config, attention_mask, hidden_states):
        build_alibi_tensor = modeling_class("falcon", "build_alibi_tensor")
        return build_alibi_tensor(attention_mask, config.num_attention_heads, dtype=hidden_states.dtype)
