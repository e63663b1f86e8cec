"""Every supported family, split into uneven spans, reproduces the full transformers model.

For each family a tiny random model (6 blocks, wide init so greedy output varies, sliding
windows of 16 tokens, several MoE experts, ...; see scripts/make_tiny_model.py) is split at
[0, 2) [2, 5) [5, 6) and run in this process: greedy tokens must equal transformers' `generate`
(batch 2, left padding, a 40-token prompt: longer than every sliding window) and every step's
logits must be within fp32 rounding of it. The same families served by real peer processes are
in test_families_swarm.py. An architecture without an adapter is refused with the list of
supported ones, by `from_pretrained` and by `molink-peer join`.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from molink.peer.checkpoint import Checkpoint, load_config
from molink.peer.families import UnsupportedArchitecture, get_family, supported_model_types
from molink.peer.span import positions_from_mask
from molink.swarm.model import LocalSpansModelForCausalLM

SPANS = [(0, 2), (2, 5), (5, 6)]
NEW_TOKENS = 32
PROMPT = 40  # > the tiny models' sliding windows (16)
TOLERANCE = 1e-5  # fp32; measured max differences are ~2e-6 for every family

#: test case -> (model type, config overrides beyond scripts/make_tiny_model.py's FAMILY_EXTRAS)
CASES = {
    "llama": ("llama", {}),
    "mistral": ("mistral", {}),
    "mixtral": ("mixtral", {}),
    "qwen2": ("qwen2", {}),
    "qwen2_moe": ("qwen2_moe", {}),
    "qwen3": ("qwen3", {}),
    "qwen3_moe": ("qwen3_moe", {}),
    "gemma": ("gemma", {}),
    "gemma2": ("gemma2", {}),
    "gemma3_text": ("gemma3_text", {}),
    "phi": ("phi", {}),
    "phi3": ("phi3", {}),
    "gpt2": ("gpt2", {}),
    "gpt_neox": ("gpt_neox", {}),
    "gptj": ("gptj", {}),
    "falcon": ("falcon", {}),  # rotary, multi-query, parallel attention (Falcon-7B style)
    "falcon-alibi": ("falcon", {"alibi": True}),  # Falcon-RW style
    "falcon-new-arch": ("falcon", {"new_decoder_architecture": True, "num_kv_heads": 2}),  # Falcon-40B style
    "bloom": ("bloom", {}),
    "opt": ("opt", {}),
    "stablelm": ("stablelm", {}),
    "starcoder2": ("starcoder2", {}),
    "cohere": ("cohere", {}),
    "olmo2": ("olmo2", {}),
    "granite": ("granite", {}),
    "deepseek_v2": ("deepseek_v2", {}),
    "deepseek_v3": ("deepseek_v3", {}),
}

#: the families the issue asks for, by model type
ISSUE_FAMILIES = {"llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma", "gemma2",
                  "gemma3_text", "phi", "phi3", "gpt2", "gpt_neox", "gptj", "falcon", "bloom", "opt", "stablelm",
                  "starcoder2", "cohere", "olmo2", "granite", "deepseek_v2", "deepseek_v3"}


def tiny_model_dir(factory, case: str):
    model_type, overrides = CASES[case]
    return factory(model_type, layers=6, shards=2, **overrides)


def prompts(batch: int = 2, length: int = PROMPT, pad: int = 7, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 500, (batch, length), generator=gen)
    mask = torch.ones_like(ids)
    if batch > 1:
        mask[1, :pad] = 0  # left padding on the second row
        ids[1, :pad] = 0
    return ids, mask


def greedy_through_spans(model, ids, mask, steps: int):
    """Greedy decoding through the spans by hand: (tokens, each step's logits)."""
    sessions = [span.new_session() for span in model.spans]
    seen, step_ids, step_mask, tokens, logits = mask, ids, mask, [], []
    for _ in range(steps):
        positions = positions_from_mask(seen)[:, -step_ids.shape[1]:]
        hidden = model.head.embed(step_ids, positions)
        for span, session in zip(model.spans, sessions):
            hidden = span.step(session, hidden, step_mask)
        step_logits = model.head.logits(hidden)[:, -1]
        tokens.append(step_logits.argmax(-1))
        logits.append(step_logits)
        step_ids, step_mask = tokens[-1][:, None], torch.ones(len(ids), 1, dtype=torch.long)
        seen = torch.cat([seen, step_mask], dim=1)
    return torch.stack(tokens, 1), torch.stack(logits, 1)


@pytest.fixture(scope="module", params=list(CASES))
def family(request, tiny_model_factory):
    """One family at a time: its checkpoint, the full reference model and the span-split model."""
    model_dir = tiny_model_dir(tiny_model_factory, request.param)
    reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    model = LocalSpansModelForCausalLM.from_pretrained(model_dir, SPANS, progress=False)
    ids, mask = prompts()
    expected = reference.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False,
                                  eos_token_id=None, output_logits=True, return_dict_in_generate=True)
    return dict(case=request.param, dir=model_dir, reference=reference, model=model, ids=ids, mask=mask,
                expected=expected)


def test_spans_match_full_model(family):
    ids, mask, expected, model = family["ids"], family["mask"], family["expected"], family["model"]
    window = getattr(model.config, "sliding_window", None)
    assert not window or window < ids.shape[1], "the prompt must be longer than the sliding window"
    tokens, logits = greedy_through_spans(model, ids, mask, NEW_TOKENS)
    assert torch.equal(tokens, expected.sequences[:, ids.shape[1]:]), family["case"]
    assert len(set(tokens[0].tolist())) > 5, "degenerate test model: output is one repeated token"
    max_diff = (logits - torch.stack(expected.logits, 1)).abs().max().item()
    assert max_diff <= TOLERANCE, f"{family['case']}: logits differ by {max_diff:.2e}"


def test_generate_front_end_matches_transformers(family):
    """The client's own generate loop (positions for learned-position families included)."""
    ids, mask, reference, model = family["ids"], family["mask"], family["reference"], family["model"]
    expected = reference.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False)
    got = model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False)
    assert torch.equal(got, expected), family["case"]


def test_spans_use_the_reference_kernels(family):
    """Same attention kernel as from_pretrained (eager for Gemma2/BLOOM) and MoE experts kernel."""
    config, reference = family["model"].config, family["reference"].config
    assert config._attn_implementation == reference._attn_implementation
    assert config._experts_implementation == reference._experts_implementation


def test_every_tensor_belongs_to_one_block_or_the_client(family):
    """Blocks and client head split the checkpoint between them, nothing read twice or left over
    (a tied head reads the embeddings' tensor)."""
    config = load_config(family["dir"])
    adapter = get_family(config)
    checkpoint = Checkpoint.open(family["dir"])
    blocks = [checkpoint.names_with_prefix(adapter.block_prefix(config, i)) for i in range(config.num_hidden_layers)]
    client = set(adapter.client_tensor_names(config).values())
    owned = [name for names in blocks for name in names] + sorted(client)
    assert all(blocks) and sorted(owned) == sorted(checkpoint.weight_map)


@pytest.mark.parametrize("tied", [True, False])
def test_tied_and_untied_heads(tiny_model_factory, tied):
    """Gemma ties its head by default; the client reads the embeddings' tensor for it."""
    model_dir = tiny_model_factory("gemma", layers=2, tie_word_embeddings=tied)
    config = load_config(model_dir)
    names = get_family(config).client_tensor_names(config)
    assert (names["lm_head.weight"] == names["embed_tokens.weight"]) == tied
    reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    model = LocalSpansModelForCausalLM.from_pretrained(model_dir, [(0, 1), (1, 2)], progress=False)
    ids, mask = prompts(length=12)
    expected = reference.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False), expected)


def test_all_issue_families_are_supported():
    assert ISSUE_FAMILIES <= set(supported_model_types())
    assert {model_type for model_type, _ in CASES.values()} == set(supported_model_types())


# ---------------------------------------------------------------------------- unsupported


@pytest.fixture(scope="module")
def unsupported_dir(tmp_path_factory):
    """A real (tiny) checkpoint of an architecture with no adapter: Mamba (no attention at all)."""
    out = tmp_path_factory.mktemp("tiny-mamba")
    config = AutoConfig.for_model("mamba", vocab_size=64, hidden_size=16, state_size=4, num_hidden_layers=2)
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    return out


def test_from_pretrained_refuses_unsupported_architecture(unsupported_dir):
    from molink.swarm import DistributedModelForCausalLM

    with pytest.raises(UnsupportedArchitecture, match=r"'mamba' is not supported; supported: .*gpt2.*llama"):
        LocalSpansModelForCausalLM.from_pretrained(unsupported_dir, [(0, 1), (1, 2)], progress=False)
    # refused while loading the client pieces, before any network is touched
    with pytest.raises(UnsupportedArchitecture, match=r"'mamba' is not supported; supported: .*bloom.*qwen3_moe"):
        DistributedModelForCausalLM.from_pretrained(unsupported_dir, ["/ip4/127.0.0.1/tcp/9/p2p/QmUnused"])


@pytest.mark.parametrize("blocks", [["--blocks", "0:1"], []], ids=["fixed-span", "auto-span"])
def test_join_refuses_unsupported_architecture(unsupported_dir, blocks):
    result = subprocess.run(
        [sys.executable, "-m", "molink.peer.cli", "join", "--model", str(unsupported_dir), *blocks,
         "--initial-peers", "/ip4/127.0.0.1/tcp/9/p2p/QmUnused"],
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "error: model type 'mamba' is not supported; supported: " in result.stderr
    assert "falcon" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("model_type, flag", [("gemma3_text", "use_bidirectional_attention"),
                                              ("gpt2", "add_cross_attention")])
def test_variants_we_cannot_run_exactly_are_refused(model_type, flag):
    with pytest.raises(UnsupportedArchitecture, match=f"{model_type} with {flag}=True is not supported"):
        get_family(AutoConfig.for_model(model_type, **{flag: True}))
