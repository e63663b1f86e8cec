"""Llama-like decoders: rotary positions, RMSNorm, causal or sliding-window masks.

Serves Llama, Mistral and Qwen2: their blocks have the same call signature and differ only in
the mask each layer needs (Mistral: sliding window for every layer when `sliding_window` is set;
Qwen2: per-layer `layer_types`). The modules themselves are transformers' own classes, so a span
computes exactly what the full model computes.
"""

from __future__ import annotations

import importlib

import torch
from torch import nn
from transformers import PretrainedConfig
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from molink.peer.families.base import ClientHead, FamilyAdapter, SpanContext

_CLASS_PREFIX = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2"}


def _modeling_class(config: PretrainedConfig, suffix: str) -> type[nn.Module]:
    module = importlib.import_module(f"transformers.models.{config.model_type}.modeling_{config.model_type}")
    return getattr(module, _CLASS_PREFIX[config.model_type] + suffix)


def attention_type(config: PretrainedConfig, index: int) -> str:
    """"full_attention" or "sliding_attention" for block `index`, as the full model decides it."""
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        return layer_types[index]
    if config.model_type == "mistral" and getattr(config, "sliding_window", None) is not None:
        return "sliding_attention"
    return "full_attention"


_MASK_BUILDERS = {
    "full_attention": create_causal_mask,
    "sliding_attention": create_sliding_window_causal_mask,
}


class LlamaLikeContext(SpanContext):
    def __init__(self, config: PretrainedConfig):
        super().__init__()
        self.config = config
        self.rotary_emb = _modeling_class(config, "RotaryEmbedding")(config=config)


class LlamaFamily(FamilyAdapter):
    model_types = tuple(_CLASS_PREFIX)

    def block_prefix(self, config: PretrainedConfig, index: int) -> str:
        return f"model.layers.{index}."

    def client_tensor_names(self, config: PretrainedConfig) -> dict[str, str]:
        head = "model.embed_tokens.weight" if config.tie_word_embeddings else "lm_head.weight"
        return {
            "embed_tokens.weight": "model.embed_tokens.weight",
            "final_norm.weight": "model.norm.weight",
            "lm_head.weight": head,
        }

    def build_block(self, config: PretrainedConfig, index: int) -> nn.Module:
        with torch.device("meta"):
            return _modeling_class(config, "DecoderLayer")(config, layer_idx=index)

    def build_client_head(self, config: PretrainedConfig) -> ClientHead:
        norm_class = _modeling_class(config, "RMSNorm")
        with torch.device("meta"):
            return ClientHead(
                embed_tokens=nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id),
                final_norm=norm_class(config.hidden_size, eps=config.rms_norm_eps),
                lm_head=nn.Linear(config.hidden_size, config.vocab_size, bias=False),
            )

    def make_span_context(self, config: PretrainedConfig, device: torch.device) -> SpanContext:
        with torch.device(device):
            return LlamaLikeContext(config)

    def run_blocks(self, context, blocks, first_block, hidden_states, attention_mask, position_ids, cache):
        config = context.config
        kinds = [attention_type(config, first_block + i) for i in range(len(blocks))]
        masks = {}
        for kind in dict.fromkeys(kinds):
            # The cache knows the sizes of the layers it has filled: ask it about a layer of
            # this span (layer_idx), never the model's first layer, which lives on another peer.
            masks[kind] = _MASK_BUILDERS[kind](
                config=config,
                inputs_embeds=hidden_states,
                attention_mask=attention_mask,
                cache=cache,
                position_ids=position_ids,
                layer_idx=first_block + kinds.index(kind),
            )
        position_embeddings = context.rotary_emb(hidden_states, position_ids=position_ids)
        for block, kind in zip(blocks, kinds):
            hidden_states = block(
                hidden_states,
                attention_mask=masks[kind],
                position_ids=position_ids,
                cache=cache,
                use_cache=True,
                position_embeddings=position_embeddings,
            )
        return hidden_states
