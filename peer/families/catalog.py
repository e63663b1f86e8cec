"""Every family MoLink serves, one declaration each, read off transformers' modeling_<family>.py.

What differs between families, and where it lives:
- positions: rotary tables (computed by each span from the positions it derives from the mask;
  Gemma3: one table per layer type), ALiBi (BLOOM, Falcon with `alibi`: computed by each span
  from the mask, see alibi.py), learned absolute positions (GPT-2, OPT: added by the client to
  the token embeddings, from the same mask-derived positions);
- masks: causal; sliding window for every block when `sliding_window` is set (Mistral, Mixtral,
  Phi-3, Starcoder2, Qwen3-MoE); per-block `layer_types` (Qwen2, Qwen2-MoE, Qwen3, Gemma2, Gemma3);
- the client's pieces: norms (RMSNorm, Gemma's 1 + w, LayerNorm with or without bias, Cohere's
  own), lm_head bias (Phi, GPT-J), tied heads (found by transformers itself), scaled embeddings
  (Gemma's own embedding class), BLOOM's embedding LayerNorm, OPT's projections, Granite's
  multipliers, Cohere's logit_scale, Gemma2/3's final logit soft-capping;
- MoE routing (Mixtral, Qwen2-MoE, Qwen3-MoE, DeepSeek-V2/V3) is inside the decoder layer classes;
  their checkpoints store one tensor per expert and are converted on load (common.py).
"""

from __future__ import annotations

from molink.peer.families.alibi import BloomFamily, FalconFamily
from molink.peer.families.decoder import Decoder, DecoderFamily


def _rotary(model_type: str, prefix: str, module: str | None = None, **options) -> Decoder:
    """A Llama-like family: model.layers.N, <Prefix>DecoderLayer, <Prefix>RotaryEmbedding."""
    return Decoder(model_type, f"{prefix}DecoderLayer", module=module, rotary=f"{prefix}RotaryEmbedding", **options)


DECODERS: list[Decoder] = [
    _rotary("llama", "Llama"),
    _rotary("mistral", "Mistral", masks="sliding"),
    _rotary("mixtral", "Mixtral", masks="sliding"),
    _rotary("qwen2", "Qwen2", masks="layer_types"),
    _rotary("qwen2_moe", "Qwen2Moe", masks="layer_types"),
    _rotary("qwen3", "Qwen3", masks="layer_types"),
    _rotary("qwen3_moe", "Qwen3Moe", masks="sliding"),
    _rotary("gemma", "Gemma"),
    _rotary("gemma2", "Gemma2", masks="layer_types", final_logit_softcapping="final_logit_softcapping"),
    _rotary("gemma3_text", "Gemma3", module="gemma3", masks="layer_types", rotary_per_layer_type=True,
            final_logit_softcapping="final_logit_softcapping",
            refuse=(("use_bidirectional_attention", "bidirectional attention makes an embedding model"),)),
    _rotary("phi", "Phi", final_norm="model.final_layernorm"),
    _rotary("phi3", "Phi3", masks="sliding"),
    _rotary("stablelm", "StableLm"),
    _rotary("starcoder2", "Starcoder2", masks="sliding"),
    _rotary("cohere", "Cohere", logit_scale="logit_scale"),
    _rotary("olmo2", "Olmo2"),
    _rotary("granite", "Granite", embedding_multiplier="embedding_multiplier", logits_scaling="logits_scaling"),
    _rotary("deepseek_v2", "DeepseekV2"),
    _rotary("deepseek_v3", "DeepseekV3"),
    Decoder("gpt2", "GPT2Block", layers="transformer.h", embed="transformer.wte",
            embed_positions="transformer.wpe", final_norm="transformer.ln_f",
            refuse=(("add_cross_attention", "cross-attention needs an encoder's states"),)),
    Decoder("opt", "OPTDecoderLayer", layers="model.decoder.layers", embed="model.decoder.embed_tokens",
            embed_positions="model.decoder.embed_positions", project_in="model.decoder.project_in",
            final_norm="model.decoder.final_layer_norm", project_out="model.decoder.project_out"),
    Decoder("gpt_neox", "GPTNeoXLayer", layers="gpt_neox.layers", rotary="GPTNeoXRotaryEmbedding",
            cache_arg="layer_past", embed="gpt_neox.embed_in", final_norm="gpt_neox.final_layer_norm"),
    Decoder("gptj", "GPTJBlock", layers="transformer.h", rotary="GPTJRotaryEmbedding",
            embed="transformer.wte", final_norm="transformer.ln_f"),
]

ALIBI_DECODERS: list[DecoderFamily] = [
    BloomFamily(Decoder("bloom", "BloomBlock", layers="transformer.h", cache_arg="layer_past",
                        embed="transformer.word_embeddings", embed_norm="transformer.word_embeddings_layernorm",
                        final_norm="transformer.ln_f")),
    FalconFamily(Decoder("falcon", "FalconDecoderLayer", layers="transformer.h", rotary="FalconRotaryEmbedding",
                         cache_arg="layer_past", embed="transformer.word_embeddings", final_norm="transformer.ln_f")),
]

ADAPTERS = [DecoderFamily(d) for d in DECODERS] + ALIBI_DECODERS
