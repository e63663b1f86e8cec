"""What the lossy q8 codec does to SmolLM2's greedy tokens, and what each codec puts on the wire.

    python scripts/bench_quant.py [--dtypes float32 bfloat16] [--new-tokens 128] [--out bench_results/quant.json]

No network: the demo's three spans (blocks 0:10, 10:20, 20:30) run in this process with the repo's
span code (peer/span.py) and generation loop (swarm/generation.py), and the hidden states go
through the real wire encoder and decoder at every boundary a token crosses in the swarm — client
-> span 1 -> span 2 -> span 3 -> client, k + 1 = 4 hops — with codec "raw" (exact) and "q8".
10 fixed chat prompts in one left-padded batch (what the spans do with padding is tested exact
elsewhere; every variant sees the same batch), 128 new tokens, greedy, end-of-sequence ignored so
every prompt yields all 128 tokens.

Per variant, against raw: prompts whose 128 tokens are all identical, the mean position of the
first divergence (128 when none), the mean fraction of positions that agree (free running: after
a first divergence the texts part ways), and the teacher-forced top-1 agreement (the exact run's
tokens fed to both, one pass: how often the variant alone picks another next token). Variants
beside q8 (64-value blocks, the codec): q8 with 32- and 16-value blocks (not on the wire: the
block-size question) and, for fp32, fp16 on the wire (a 2-byte reference point). Bytes per token per hop:
the hidden-state tensor as msgpack puts it in a frame (exact run, real tokens only).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import msgpack
import torch
import trio

from molink.dht.quantization import dequantize_blockwise, quantize_blockwise
from molink.dht.wire import decode_tensor, encode_tensor
from molink.swarm.generation import generate_with_chain, merged_generation_config
from molink.swarm.model import LocalSpanChain, LocalSpansModelForCausalLM

ROOT = Path(__file__).resolve().parent.parent
SPANS = [(0, 10), (10, 20), (20, 30)]  # the demo's (scripts/demo.sh, tests/test_swarm.py)
PROMPTS = [
    "What is the capital of France?",
    "Explain photosynthesis in simple terms.",
    "Write a short poem about the sea.",
    "Give me three tips for learning a new language.",
    "How does a bicycle stay upright?",
    "What are the main differences between Python and C?",
    "Describe the water cycle.",
    "Why is the sky blue?",
    "Suggest a name for a friendly robot and explain why.",
    "Summarize the plot of Romeo and Juliet.",
]


def q8_blocks_of(block: int):
    def round_trip(hidden: torch.Tensor) -> torch.Tensor:
        values, scales = quantize_blockwise(hidden, block)
        return dequantize_blockwise(values, scales, block).to(hidden.dtype).reshape(hidden.shape)
    return round_trip


VARIANTS = {  # name -> what one hop does to the hidden states
    "raw": lambda hidden: decode_tensor(encode_tensor(hidden, codec="raw")),
    "q8": lambda hidden: decode_tensor(encode_tensor(hidden, codec="q8")),
    "q8 block 32": q8_blocks_of(32),
    "q8 block 16": q8_blocks_of(16),
    "fp16 wire": lambda hidden: hidden.to(torch.float16).to(hidden.dtype),
}


class WireSpanChain(LocalSpanChain):
    """The spans in process, with every hop's hidden states through `round_trip`."""

    def __init__(self, spans, round_trip, tally: dict | None = None):
        super().__init__(spans)
        self.round_trip, self.tally = round_trip, tally

    def _hop(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.tally is not None:
            self._count_bytes(hidden, mask)
        return self.round_trip(hidden)

    def _count_bytes(self, hidden: torch.Tensor, mask: torch.Tensor) -> None:
        """Bytes per real token, row by row: left padding would flatter zstd (repeated states)."""
        kind = "decode" if hidden.shape[1] == 1 else "prompt"
        for row, row_mask in zip(hidden, mask):
            real = row[row_mask.bool()][None]
            for codec in ("raw", "zstd", "q8"):
                size = len(msgpack.packb(encode_tensor(real, codec=codec), use_bin_type=True))
                self.tally[(kind, codec)].append((size, real.shape[1]))

    async def step(self, hidden_states: torch.Tensor, new_mask: torch.Tensor) -> torch.Tensor:
        hidden_states = self._hop(hidden_states, new_mask)  # client -> first peer
        for span, session in zip(self.spans, self.sessions):
            # -> the next peer, or back to the client
            hidden_states = self._hop(span.step(session, hidden_states, new_mask), new_mask)
        return hidden_states


def first_divergence(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))


def forced_choices(model, round_trip, ids: torch.Tensor, mask: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """Greedy next-token choices at the last `new_tokens` positions, the whole sequence in one pass."""
    chain = WireSpanChain(model.spans, round_trip)
    hidden = trio.run(chain.step, model.head.embed(ids), mask)
    with torch.inference_mode():
        return model.head.logits(hidden[:, -new_tokens - 1:-1]).argmax(-1)


def run_dtype(model_dir: Path, tokenizer, dtype: torch.dtype, new_tokens: int) -> dict:
    model = LocalSpansModelForCausalLM.from_pretrained(model_dir, spans=SPANS, dtype=dtype, progress=False)
    config = merged_generation_config(model.generation_config, max_new_tokens=new_tokens, do_sample=False)
    config.eos_token_id = None  # all prompts run the full length: agreement over the same 128 positions
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                           add_generation_prompt=True) for prompt in PROMPTS]
    batch = tokenizer(texts, return_tensors="pt", padding=True, padding_side="left")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    variants = [v for v in VARIANTS if v != "fp16 wire" or dtype == torch.float32]
    tally: dict = defaultdict(list)
    tokens: dict[str, list[list[int]]] = {}
    exact_sequence = None
    for name in variants:
        started = time.monotonic()
        chain = WireSpanChain(model.spans, VARIANTS[name], tally if name == "raw" else None)
        out = trio.run(generate_with_chain, model.head, chain, ids, mask, config)
        tokens[name] = out[:, ids.shape[1]:].tolist()
        exact_sequence = out if name == "raw" else exact_sequence
        print(f"[bench] {dtype} {name}: {time.monotonic() - started:.0f} s", file=sys.stderr)
    full_mask = torch.cat([mask, torch.ones(len(PROMPTS), new_tokens, dtype=mask.dtype)], dim=1)
    forced = {name: forced_choices(model, VARIANTS[name], exact_sequence, full_mask, new_tokens) for name in variants}
    rows = []
    for name in variants[1:]:
        divergence = [first_divergence(a, b) for a, b in zip(tokens["raw"], tokens[name])]
        agreement = [sum(x == y for x, y in zip(a, b)) / len(a) for a, b in zip(tokens["raw"], tokens[name])]
        rows.append({"variant": name, "all_identical": sum(d == new_tokens for d in divergence) / len(PROMPTS),
                     "mean_first_divergence": statistics.mean(divergence), "first_divergence": divergence,
                     "mean_token_agreement": statistics.mean(agreement),
                     "teacher_forced_agreement": (forced[name] == forced["raw"]).float().mean().item(),
                     "sample": tokenizer.decode(tokens[name][0])})
    return {"dtype": str(dtype).removeprefix("torch."), "prompts": len(PROMPTS), "new_tokens": new_tokens,
            "variants": rows, "raw_sample": tokenizer.decode(tokens["raw"][0]), "tokens": tokens,
            "bytes_per_token_per_hop": {f"{kind} {codec}": sum(n for n, _ in sizes) / sum(t for _, t in sizes)
                                        for (kind, codec), sizes in sorted(tally.items())}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"],
                        choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--out", default=str(ROOT / "bench_results" / "quant.json"))
    args = parser.parse_args()
    from transformers import AutoTokenizer

    from molink.swarm.default_model import convert_smollm2

    model_dir = convert_smollm2()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    results = [run_dtype(model_dir, tokenizer, getattr(torch, name), args.new_tokens) for name in args.dtypes]
    print(f"\nSmolLM2-135M-Instruct, spans {SPANS}, {len(PROMPTS)} chat prompts x {args.new_tokens} greedy tokens, "
          "each variant against raw (exact) on all 4 hops")
    print("| dtype | variant | all tokens identical | mean first divergence | mean token agreement "
          "| teacher-forced top-1 agreement |")
    print("|---|---|---|---|---|---|")
    for r in results:
        for v in r["variants"]:
            print(f"| {r['dtype']} | {v['variant']} | {round(v['all_identical'] * r['prompts'])}/{r['prompts']} | "
                  f"{v['mean_first_divergence']:.1f} {v['first_divergence']} | {v['mean_token_agreement']:.1%} | "
                  f"{v['teacher_forced_agreement']:.1%} |")
    print("\nhidden-state bytes per token per hop (msgpack tensor map)")
    print("| dtype | step | raw | zstd | q8 |")
    print("|---|---|---|---|---|")
    for r in results:
        b = r["bytes_per_token_per_hop"]
        for kind in ("decode", "prompt"):
            print(f"| {r['dtype']} | {kind} | {b[f'{kind} raw']:.0f} | {b[f'{kind} zstd']:.0f} | {b[f'{kind} q8']:.0f} |")
    for r in results:
        print(f"\n{r['dtype']} prompt 1, raw: {r['raw_sample']!r}")
        for v in r["variants"]:
            print(f"{r['dtype']} prompt 1, {v['variant']}: {v['sample']!r}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
