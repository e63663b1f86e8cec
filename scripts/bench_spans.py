"""Benchmark the span seam: decode step time and loading memory, full model vs spans in one process.

    python scripts/bench_spans.py [--models tiny,smollm2] [--steps 64] [--repeats 5] [--out bench_results/spans.json]

1. ms per decode step: transformers' full model (forward with its KV cache, one token at a time)
   against the same weights run span by span through MoLink's SpanModel (3 spans) + client head.
   The two are measured interleaved, repeat by repeat, and the median is reported.
2. peak RSS added by loading 1/3 of the blocks vs all of them (each in a fresh subprocess, peak
   reset after imports via /proc/self/clear_refs), next to the bytes of those weights.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))


def model_dirs(names: list[str]) -> dict[str, Path]:
    dirs = {}
    for name in names:
        if name == "tiny":
            from make_tiny_model import make_tiny_model

            dirs[name] = make_tiny_model("llama", Path(tempfile.mkdtemp()) / "tiny", layers=6,
                                         hidden_size=256, intermediate_size=512, num_attention_heads=8,
                                         num_key_value_heads=4)
        elif name == "smollm2":
            from molink.swarm.default_model import convert_smollm2

            dirs[name] = convert_smollm2()
        else:
            dirs[name] = Path(name)
    return dirs


@torch.inference_mode()
def time_full_model(model, prompt, steps: int) -> float:
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    mask = torch.ones_like(prompt)
    out = model(input_ids=prompt, attention_mask=mask, cache=cache, use_cache=True, logits_to_keep=1)
    token = out.logits[:, -1].argmax(-1, keepdim=True)
    started = time.perf_counter()
    for _ in range(steps):
        mask = torch.cat([mask, torch.ones_like(token)], dim=1)
        position_ids = torch.full_like(token, mask.shape[1] - 1)
        out = model(input_ids=token, attention_mask=mask, position_ids=position_ids, cache=cache,
                    use_cache=True, logits_to_keep=1)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
    return (time.perf_counter() - started) / steps


@torch.inference_mode()
def time_spans(local_model, prompt, steps: int) -> float:
    sessions = [span.new_session() for span in local_model.spans]
    head = local_model.head

    def through_spans(ids):
        hidden = head.embed(ids)
        for span, session in zip(local_model.spans, sessions):
            hidden = span.step(session, hidden, torch.ones_like(ids))
        return head.logits(hidden[:, -1:])[:, -1].argmax(-1, keepdim=True)

    token = through_spans(prompt)
    started = time.perf_counter()
    for _ in range(steps):
        token = through_spans(token)
    return (time.perf_counter() - started) / steps


def bench_decode(name: str, model_dir: Path, steps: int, repeats: int) -> dict:
    from transformers import AutoModelForCausalLM

    from molink.swarm.model import LocalSpansModelForCausalLM

    full = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).train(False)
    spans = LocalSpansModelForCausalLM.from_pretrained(model_dir, 3, progress=False)
    prompt = torch.randint(3, 400, (1, 16), generator=torch.Generator().manual_seed(0))
    time_full_model(full, prompt, 4), time_spans(spans, prompt, 4)  # warm up
    full_ms, span_ms = [], []
    for _ in range(repeats):
        full_ms.append(1000 * time_full_model(full, prompt, steps))
        span_ms.append(1000 * time_spans(spans, prompt, steps))
    full_med, span_med = statistics.median(full_ms), statistics.median(span_ms)
    return {"model": name, "full_ms_per_step": full_med, "spans_ms_per_step": span_med,
            "overhead_pct": 100 * (span_med / full_med - 1), "spans": [(s.start, s.end) for s in spans.spans]}


RSS_PROBE = r"""
import json, sys, torch, transformers
from molink.peer.span import SpanModel
from molink.peer.checkpoint import Checkpoint, load_config
def rss_kb(field):
    for line in open('/proc/self/status'):
        if line.startswith(field):
            return int(line.split()[1])
model_dir, start, end = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
ckpt = Checkpoint.open(model_dir)
names = [n for i in range(start, end) for n in ckpt.names_with_prefix(f"model.layers.{i}.")]
weight_bytes = ckpt.total_bytes(names)
import tqdm.auto  # noqa: F401  (import costs are not weights: they do not grow with the span)
from molink.peer.families import get_family
config = load_config(model_dir)
get_family(config).build_block(config, 0)  # imports the family's modeling code (meta device, no weights)
with torch.inference_mode():  # start torch's thread pools and allocator before measuring
    float((torch.randn(256, 256) @ torch.randn(256, 256)).sum())
open('/proc/self/clear_refs', 'w').write('5')  # reset the peak to what we hold now
base = rss_kb('VmRSS:')
span = SpanModel.load(model_dir, start, end, progress=False)
# Fault every weight page in: memory-mapped tensors count only once touched, as serving touches them.
with torch.inference_mode():
    touched = sum(float(p.float().sum()) for b in span.blocks for p in b.parameters())
print(json.dumps({"weight_bytes": weight_bytes, "peak_added_bytes": (rss_kb('VmHWM:') - base) * 1024}))
"""


def bench_memory(name: str, model_dir: Path) -> dict:
    from molink.peer.checkpoint import load_config

    layers = load_config(model_dir).num_hidden_layers
    result = {"model": name}
    for label, end in (("third", layers // 3), ("all", layers)):
        out = subprocess.run([sys.executable, "-c", RSS_PROBE, str(model_dir), "0", str(end)],
                             capture_output=True, text=True, check=True)
        result[label] = json.loads(out.stdout.strip().splitlines()[-1])
    all_weights = result["all"]["weight_bytes"]
    result["third_peak_vs_third_of_weights"] = result["third"]["peak_added_bytes"] / (all_weights / 3)
    result["all_peak_vs_weights"] = result["all"]["peak_added_bytes"] / all_weights
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="tiny,smollm2")
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=str(ROOT / "bench_results" / "spans.json"))
    args = parser.parse_args()
    dirs = model_dirs(args.models.split(","))
    decode, memory = [], []
    for name, model_dir in dirs.items():
        print(f"[bench] {name}: decode steps ...", file=sys.stderr, flush=True)
        decode.append(bench_decode(name, model_dir, args.steps, args.repeats))
        print(f"[bench] {name}: loading memory ...", file=sys.stderr, flush=True)
        memory.append(bench_memory(name, model_dir))
    print(f"\nDecode step, batch 1, {args.steps} steps x {args.repeats} repeats (median), torch threads "
          f"{torch.get_num_threads()}")
    print("| model | full transformers ms/step | 3 spans ms/step | overhead |")
    print("|---|---|---|---|")
    for row in decode:
        print(f"| {row['model']} | {row['full_ms_per_step']:.3f} | {row['spans_ms_per_step']:.3f} | "
              f"{row['overhead_pct']:+.1f} % |")
    print("\nPeak RSS added by loading blocks (weights = fp32 bytes of the blocks loaded)")
    print("| model | 1/3 blocks: weights MB | peak MB | all blocks: weights MB | peak MB | peak(1/3) / (all/3) |")
    print("|---|---|---|---|---|---|")
    for row in memory:
        t, a = row["third"], row["all"]
        print(f"| {row['model']} | {t['weight_bytes'] / 1e6:.1f} | {t['peak_added_bytes'] / 1e6:.1f} | "
              f"{a['weight_bytes'] / 1e6:.1f} | {a['peak_added_bytes'] / 1e6:.1f} | "
              f"{row['third_peak_vs_third_of_weights']:.3f} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"decode": decode, "memory": memory}, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
