"""What zstd gains on real hidden states: ratio and speed per level, per dtype.

    python scripts/bench_codec.py [--tokens 128] [--out bench_results/codec.json]

Hidden states are SmolLM2-135M's activations at the span boundaries the demo uses (after blocks
10 and 20) for a real prompt, as fp32, fp16 and bf16. For each zstd level: compression ratio,
compress and decompress MB/s (of raw bytes). The wire default is the level with the best
"time saved per byte" on a slow link that still compresses faster than a fast link sends.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import zstandard

ROOT = Path(__file__).resolve().parent.parent
LEVELS = [1, 3, 6, 9, 15]
TEXT = ("MoLink is a peer-to-peer swarm that serves large language models on volunteers' consumer GPUs. "
        "Volunteers host a span of a model's blocks and researchers call the swarm from Python. ") * 8


def hidden_states(tokens: int) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from molink.swarm.default_model import convert_smollm2

    model_dir = convert_smollm2()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).train(False)
    ids = tokenizer(TEXT, return_tensors="pt").input_ids[:, :tokens]
    with torch.inference_mode():
        out = model(ids, output_hidden_states=True)
    return {f"after block {i}": out.hidden_states[i] for i in (10, 20)}


def measure(data: bytes, level: int, repeats: int = 5) -> dict:
    compressor, decompressor = zstandard.ZstdCompressor(level=level), zstandard.ZstdDecompressor()
    comp_t, dec_t = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        packed = compressor.compress(data)
        t1 = time.perf_counter()
        decompressor.decompress(packed)
        t2 = time.perf_counter()
        comp_t.append(t1 - t0)
        dec_t.append(t2 - t1)
    mb = len(data) / 1e6
    return {"level": level, "ratio": len(data) / len(packed), "compress_MBps": mb / statistics.median(comp_t),
            "decompress_MBps": mb / statistics.median(dec_t)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--out", default=str(ROOT / "bench_results" / "codec.json"))
    args = parser.parse_args()
    print("[bench] computing SmolLM2 hidden states ...", file=sys.stderr)
    states = hidden_states(args.tokens)
    rows = []
    for where, tensor in states.items():
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            data = tensor.to(dtype).contiguous().view(torch.uint8).numpy().tobytes()
            for level in LEVELS:
                rows.append({"where": where, "dtype": str(dtype).removeprefix("torch."), "bytes": len(data),
                             **measure(data, level)})
    print(f"\nzstd on SmolLM2 hidden states ({args.tokens} tokens x 576), median of 5")
    print("| where | dtype | level | ratio | compress MB/s | decompress MB/s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['where']} | {r['dtype']} | {r['level']} | {r['ratio']:.3f} | {r['compress_MBps']:.0f} | "
              f"{r['decompress_MBps']:.0f} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
