"""Spans of blocks run outside the full model reproduce the full transformers model exactly."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from molink.peer.checkpoint import Checkpoint
from molink.peer.families import UnsupportedArchitecture, get_family
from molink.peer.span import SpanModel
from molink.swarm.model import LocalSpansModelForCausalLM

UNEVEN_SPANS = [(0, 1), (1, 4), (4, 6)]
NEW_TOKENS = 64


def prompts(batch: int, length: int = 24, pad: int = 7, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 500, (batch, length), generator=gen)
    mask = torch.ones_like(ids)
    if batch > 1:
        mask[1, :pad] = 0  # left padding on the second row
        ids[1, :pad] = 0
    return ids, mask


def reference(model_dir):
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def span_by_span_logits(spans, head, ids, mask, steps):
    """Greedy decode through the spans by hand, returning tokens and each step's logits."""
    sessions = [span.new_session() for span in spans]
    step_ids, step_mask, tokens, logits = ids, mask, [], []
    for _ in range(steps):
        hidden = head.embed(step_ids)
        for span, session in zip(spans, sessions):
            hidden = span.step(session, hidden, step_mask)
        step_logits = head.logits(hidden)[:, -1]
        next_tokens = step_logits.argmax(-1)
        tokens.append(next_tokens)
        logits.append(step_logits)
        step_ids, step_mask = next_tokens[:, None], torch.ones(len(next_tokens), 1, dtype=torch.long)
    return torch.stack(tokens, 1), torch.stack(logits, 1)


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
@pytest.mark.parametrize("batch", [1, 2])
def test_uneven_spans_match_full_model(tiny_model_factory, family, batch):
    model_dir = tiny_model_factory(family, layers=6, shards=2)
    ref = reference(model_dir)
    model = LocalSpansModelForCausalLM.from_pretrained(model_dir, UNEVEN_SPANS, progress=False)
    ids, mask = prompts(batch, length=40)  # longer than the 16-token sliding window of mistral/qwen2
    expected = ref.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False,
                            eos_token_id=None, output_logits=True, return_dict_in_generate=True)
    tokens, logits = span_by_span_logits(model.spans, model.head, ids, mask, NEW_TOKENS)
    assert torch.equal(tokens, expected.sequences[:, ids.shape[1]:])
    assert len(set(tokens[0].tolist())) > 5, "degenerate test model: output is one repeated token"
    max_diff = (logits - torch.stack(expected.logits, 1)).abs().max().item()
    assert max_diff <= 1e-5


@pytest.mark.parametrize("options", [
    dict(do_sample=False),
    dict(do_sample=True, temperature=0.8, top_k=30, top_p=0.9, repetition_penalty=1.2),
])
def test_generate_front_end_matches_transformers_generate(tiny_llama, options):
    ref = reference(tiny_llama)
    model = LocalSpansModelForCausalLM.from_pretrained(tiny_llama, UNEVEN_SPANS, progress=False)
    ids, mask = prompts(2)
    torch.manual_seed(1234)
    expected = ref.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, **options)
    torch.manual_seed(1234)
    got = model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, **options)
    assert torch.equal(got, expected)


def test_eos_stops_and_pads_like_transformers(tiny_llama):
    ref = reference(tiny_llama)
    model = LocalSpansModelForCausalLM.from_pretrained(tiny_llama, UNEVEN_SPANS, progress=False)
    ids, mask = prompts(2)
    free_run = ref.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, eos_token_id=None)
    eos = int(free_run[0, ids.shape[1] + 3])  # row 0 "ends" at its 4th new token
    expected = ref.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, eos_token_id=eos,
                            pad_token_id=0)
    got = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, eos_token_id=eos,
                         pad_token_id=0)
    assert torch.equal(got, expected)


def test_span_loads_only_its_own_tensors(tiny_llama, monkeypatch):
    requested: list[str] = []
    original = Checkpoint.load

    def spy(self, names, *args, **kwargs):
        requested.extend(names)
        return original(self, names, *args, **kwargs)

    monkeypatch.setattr(Checkpoint, "load", spy)
    span = SpanModel.load(tiny_llama, 1, 4, progress=False)
    assert requested and all(n.startswith(("model.layers.1.", "model.layers.2.", "model.layers.3."))
                             for n in requested)
    assert len(span.blocks) == 3


def test_unsupported_architecture_names_supported_list():
    from transformers import AutoConfig

    config = AutoConfig.for_model("bert")
    with pytest.raises(UnsupportedArchitecture, match="llama.*mistral.*qwen2"):
        get_family(config)


def test_span_outside_model_is_refused(tiny_llama):
    with pytest.raises(ValueError, match="outside"):
        SpanModel.load(tiny_llama, 4, 9, progress=False)


@pytest.mark.smollm2
def test_real_smollm2_span_by_span_says_paris(smollm2_dir):
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    model = LocalSpansModelForCausalLM.from_pretrained(smollm2_dir, [(0, 7), (7, 19), (19, 30)], progress=False)
    enc = tokenizer("The capital of France is", return_tensors="pt")
    out = model.generate(enc.input_ids, attention_mask=enc.attention_mask, max_new_tokens=8, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, enc.input_ids.shape[1]:])


@pytest.mark.parametrize("family", ["llama", "falcon", "deepseek_v3"])
def test_kv_budget_per_token_matches_what_the_cache_really_holds(tiny_model_factory, family):
    span = SpanModel.load(tiny_model_factory(family, layers=4), 1, 3, progress=False)
    session = span.new_session()
    hidden = torch.randn(2, 5, span.config.hidden_size)
    span.step(session, hidden, torch.ones(2, 5, dtype=torch.long))
    held = sum(t.numel() * t.element_size() for layer in session.cache.layers
               for t in (getattr(layer, "keys", None), getattr(layer, "values", None)) if isinstance(t, torch.Tensor))
    assert span.kv_bytes_per_token() * 2 * 5 == held
