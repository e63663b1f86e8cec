"""Build a tiny random-weight model from a config and save it as safetensors (for tests and benchmarks).

    python scripts/make_tiny_model.py --family llama --out /tmp/tiny-llama [--layers 6] [--shards 2]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

TINY_COMMON = dict(
    vocab_size=512, hidden_size=64, intermediate_size=128, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False,
    # a wide init so greedy decoding does not collapse into one repeated token
    initializer_range=0.2, bos_token_id=1, eos_token_id=2, pad_token_id=0,
)
_MOE = dict(num_experts_per_tok=2, moe_intermediate_size=32)
_MLA = dict(n_routed_experts=4, n_shared_experts=1, first_k_dense_replace=1, n_group=1, topk_group=1,
            kv_lora_rank=16, q_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16,
            num_key_value_heads=4, **_MOE)  # MLA: as many KV heads as query heads
_MHA = dict(num_key_value_heads=4)  # families without grouped-query attention
#: per family: what makes the tiny model exercise the family's own mechanisms (sliding windows
#: shorter than the test prompts, MoE with several experts, soft-capping, multipliers, ...)
FAMILY_EXTRAS = {
    "llama": {},
    "mistral": {"sliding_window": 16},
    "qwen2": {"use_sliding_window": True, "sliding_window": 16, "max_window_layers": 3},
    "mixtral": {"sliding_window": 16, "num_local_experts": 4, "num_experts_per_tok": 2},
    "qwen2_moe": {"use_sliding_window": True, "sliding_window": 16, "max_window_layers": 3, "num_experts": 4,
                  "shared_expert_intermediate_size": 64, "mlp_only_layers": [1], **_MOE},
    "qwen3": {"use_sliding_window": True, "sliding_window": 16, "max_window_layers": 3, "head_dim": 16},
    "qwen3_moe": {"use_sliding_window": True, "sliding_window": 16, "num_experts": 4, "head_dim": 16,
                  "mlp_only_layers": [1], **_MOE},
    "gemma": {"head_dim": 16},
    "gemma2": {"head_dim": 16, "sliding_window": 16, "query_pre_attn_scalar": 16},
    "gemma3_text": {"head_dim": 16, "sliding_window": 16, "query_pre_attn_scalar": 16,
                    "final_logit_softcapping": 30.0},
    "phi": _MHA,
    "phi3": {"sliding_window": 16},
    "gpt2": _MHA,
    "gpt_neox": _MHA,
    "gptj": {"rotary_dim": 8, **_MHA},
    "falcon": {"num_kv_heads": 1},
    "bloom": _MHA,
    "opt": {"ffn_dim": 128, "word_embed_proj_dim": 32, **_MHA},
    "stablelm": {},
    "starcoder2": {"sliding_window": 16},
    "cohere": {},
    "olmo2": {},
    "granite": {"embedding_multiplier": 2.0, "logits_scaling": 4.0, "residual_multiplier": 0.5,
                "attention_multiplier": 0.25},
    "deepseek_v2": {"topk_method": "greedy", **_MLA},
    "deepseek_v3": _MLA,
}


def make_tiny_model(family: str, out: str | Path, layers: int = 6, seed: int = 0,
                    shards: int = 1, **overrides) -> Path:
    out = Path(out)
    config = AutoConfig.for_model(family, num_hidden_layers=layers,
                                  **{**TINY_COMMON, **FAMILY_EXTRAS[family], **overrides})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    max_shard = "2GB"
    if shards > 1:
        total = sum(p.numel() * p.element_size() for p in model.parameters())
        max_shard = f"{max(1, total // shards // 1000 + 1)}KB"
    model.save_pretrained(out, max_shard_size=max_shard)
    return out


def bench_model_dir(name: str, tmp: Path, positions: int | None = None) -> Path:
    """A benchmark's model: "tiny" (built in tmp; `positions` long enough for its longest prompt),
    "smollm2" (the real default model, converted once) or a model directory."""
    if name == "tiny":
        extra = {"max_position_embeddings": positions} if positions else {}
        return make_tiny_model("llama", tmp / "tiny", layers=6, **extra)
    if name == "smollm2":
        from molink.swarm.default_model import convert_smollm2

        return convert_smollm2()
    return Path(name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", default="llama", choices=sorted(FAMILY_EXTRAS))
    parser.add_argument("--out", required=True)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--shards", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(make_tiny_model(args.family, args.out, args.layers, args.seed, args.shards))


if __name__ == "__main__":
    main()
