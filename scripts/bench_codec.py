"""What zstd gains on real hidden states, per level and per link rate, and what the policy picks.

    python scripts/bench_codec.py [--tokens 128] [--out bench_results/codec.json]

Hidden states are SmolLM2-135M's activations at the span boundaries the demo uses (after blocks
10 and 20) for a real prompt, as fp32, fp16 and bf16.

1. Per zstd level: compression ratio, compress and decompress MB/s (of raw bytes).
2. Per hop, with the real wire functions (`encode_tensor` + `decode_tensor`) on the states after
   block 10, for a decode step (1 token) and a prefill chunk (`--tokens`): time = encode +
   bytes / link rate + decode, raw vs zstd (level 1) vs q8 (lossy, for reference), at 10 Mbit/s,
   100 Mbit/s, 1 Gbit/s and 10 Gbit/s, with the cheaper lossless codec and what
   `molink.dht.codec_policy` picks ("auto").
3. The fit the policy's `MEASURED_ZSTD` constants come from (from the 1-token and the N-token
   tensors): zstd bytes = raw bytes / ratio + header bytes; zstd's extra encode + decode time
   over raw = fixed seconds per tensor + seconds per raw byte.
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

from molink.dht.codec_policy import MEASURED_ZSTD, choose_codec
from molink.dht.wire import decode_tensor, encode_tensor

ROOT = Path(__file__).resolve().parent.parent
LEVELS = [-3, -1, 1, 3, 6, 9, 15]
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
RATES_MBIT = [10, 100, 1000, 10000]
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


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def measure_level(data: bytes, level: int, repeats: int = 5) -> dict:
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


def wire_cost(tensor: torch.Tensor, codec: str, repeats: int) -> dict:
    """Median encode and decode seconds through the wire functions, and the payload bytes."""
    enc_t, dec_t = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        obj = encode_tensor(tensor, codec=codec)
        t1 = time.perf_counter()
        decode_tensor(obj)
        t2 = time.perf_counter()
        enc_t.append(t1 - t0)
        dec_t.append(t2 - t1)
    payload = len(obj["data"]) + len(obj.get("scales", b""))
    return {"encode_s": statistics.median(enc_t), "decode_s": statistics.median(dec_t), "bytes": payload}


def hop_rows(tensor: torch.Tensor, prefill_tokens: int) -> tuple[list[dict], list[dict]]:
    rows, fits = [], []
    for dtype in DTYPES:
        extra = {}
        for label, tokens, repeats in (("decode", 1, 400), ("prefill", prefill_tokens, 40)):
            t = tensor[:, :tokens].to(dtype).contiguous()
            raw_bytes = t.numel() * t.element_size()
            costs = {codec: wire_cost(t, codec, repeats) for codec in ("raw", "zstd", "q8")}
            extra[tokens] = (raw_bytes, sum(costs["zstd"][k] - costs["raw"][k] for k in ("encode_s", "decode_s")),
                             costs["zstd"]["bytes"])
            for mbit in RATES_MBIT:
                rate = mbit * 1e6 / 8
                hop = {codec: c["encode_s"] + c["bytes"] / rate + c["decode_s"] for codec, c in costs.items()}
                best = min(("raw", "zstd"), key=hop.get)
                rows.append({"dtype": dtype_name(dtype), "step": label, "tokens": tokens, "link_mbit": mbit,
                             **{f"{codec}_bytes": c["bytes"] for codec, c in costs.items()},
                             **{f"{codec}_ms": hop[codec] * 1e3 for codec in hop},
                             **{f"{codec}_cpu_ms": (c["encode_s"] + c["decode_s"]) * 1e3 for codec, c in costs.items()},
                             "best_lossless": best,
                             "policy_break_even_mbit": MEASURED_ZSTD[dtype].break_even_rate(raw_bytes) * 8 / 1e6,
                             "policy": choose_codec("auto", dtype, raw_bytes, rate)})
        # zstd bytes = raw / ratio + header; extra time = fixed + raw bytes x per_byte (two sizes, two unknowns)
        (small_n, small_x, small_z), (big_n, big_x, big_z) = extra[1], extra[prefill_tokens]
        per_byte = (big_x - small_x) / (big_n - small_n)
        inverse_ratio = (big_z - small_z) / (big_n - small_n)
        fits.append({"dtype": dtype_name(dtype), "ratio": 1 / inverse_ratio,
                     "header_bytes": small_z - small_n * inverse_ratio,
                     "fixed_seconds": small_x - small_n * per_byte, "seconds_per_byte": per_byte})
    return rows, fits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--out", default=str(ROOT / "bench_results" / "codec.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)  # a peer's wire work shares the CPU with its compute: measure one core
    print("[bench] computing SmolLM2 hidden states ...", file=sys.stderr)
    states = hidden_states(args.tokens)
    levels = []
    for where, tensor in states.items():
        for dtype in DTYPES:
            data = tensor.to(dtype).contiguous().view(torch.uint8).numpy().tobytes()
            for level in LEVELS:
                levels.append({"where": where, "dtype": dtype_name(dtype), "bytes": len(data),
                               **measure_level(data, level)})
    print(f"\nzstd on SmolLM2 hidden states ({args.tokens} tokens x 576), median of 5")
    print("| where | dtype | level | ratio | compress MB/s | decompress MB/s |")
    print("|---|---|---|---|---|---|")
    for r in levels:
        print(f"| {r['where']} | {r['dtype']} | {r['level']} | {r['ratio']:.3f} | {r['compress_MBps']:.0f} | "
              f"{r['decompress_MBps']:.0f} |")

    print("[bench] per-hop costs through the wire functions ...", file=sys.stderr)
    hops, fits = hop_rows(states["after block 10"], args.tokens)
    print("\nper hop, after block 10: encode + bytes/rate + decode, ms (q8 is lossy: for reference)")
    print("| dtype | step | link | raw B | zstd B | q8 B | raw ms | zstd ms | q8 ms | cheaper lossless | policy |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in hops:
        link = f"{r['link_mbit'] / 1000:g} Gbit/s" if r["link_mbit"] >= 1000 else f"{r['link_mbit']} Mbit/s"
        print(f"| {r['dtype']} | {r['step']} ({r['tokens']} tok) | {link} | {r['raw_bytes']} | {r['zstd_bytes']} | "
              f"{r['q8_bytes']} | {r['raw_ms']:.3f} | {r['zstd_ms']:.3f} | {r['q8_ms']:.3f} | {r['best_lossless']} | "
              f"{r['policy']} |")
    agree = sum(r["best_lossless"] == r["policy"] for r in hops)
    print(f"\npolicy = cheaper lossless codec in {agree}/{len(hops)} cases; the policy's break-even rates:")
    for r in hops[::len(RATES_MBIT)]:
        print(f"  {r['dtype']} {r['step']} ({r['tokens']} tok): zstd below {r['policy_break_even_mbit']:.0f} Mbit/s")
    print("\nfit of zstd's extra CPU time over raw (for codec_policy.MEASURED_ZSTD):")
    for f in fits:
        print(f"  fit {f['dtype']}: ratio {f['ratio']:.3f}, header {f['header_bytes']:.0f} bytes, "
              f"fixed {f['fixed_seconds'] * 1e6:.1f} us, {f['seconds_per_byte'] * 1e9:.2f} ns/byte")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"levels": levels, "hops": hops, "fit": fits,
                                          "policy_agrees": [agree, len(hops)]}, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
