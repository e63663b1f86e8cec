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
FAMILY_EXTRAS = {
    "llama": {},
    "mistral": {"sliding_window": 16},
    "qwen2": {"use_sliding_window": True, "sliding_window": 16, "max_window_layers": 3},
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
