"""One adapter for every decoder-only family, driven by a short declaration per family.

A `Decoder` declaration says what the family's own `modeling_<family>.py` does, read off its
forward: where its blocks live in the checkpoint, which class a block is, how positions reach
a block (a rotary table computed once per step, ALiBi biases, or nothing: learned absolute
positions are added by the client), which mask each block gets, the keyword a block takes its
cache under, and what the client does around the blocks. `DecoderFamily` turns that into the
`FamilyAdapter` seam using transformers' own classes, so a span computes what the full model
computes (tests/test_families.py holds every family to transformers' `generate`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import PretrainedConfig
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from molink.peer.families.base import ClientHead, FamilyAdapter, SpanContext, UnsupportedArchitecture
from molink.peer.families.common import (
    checkpoint_layout_hook, checkpoint_name, modeling_class, skeleton, tied_head,
)

MASK_BUILDERS = {
    "full_attention": create_causal_mask,
    "sliding_attention": create_sliding_window_causal_mask,
}


@dataclass(frozen=True)
class Decoder:
    """How one family's full model runs, between its embeddings and its logits."""

    model_type: str
    layer: str  # decoder layer class in transformers.models.<module>.modeling_<module>
    layers: str = "model.layers"  # the block list's path in the ForCausalLM (= checkpoint prefix)
    module: str | None = None  # transformers.models.<module> (default: model_type)
    rotary: str | None = None  # rotary embedding class: its (cos, sin) go to every block
    rotary_per_layer_type: bool = False  # Gemma3: one rotary table per layer type (local / global)
    #: which mask a block gets, as the model's forward chooses it:
    #: "causal" (every block), "sliding" (every block, when config.sliding_window is set),
    #: "layer_types" (block i gets config.layer_types[i])
    masks: str = "causal"
    cache_arg: str = "cache"  # the keyword a block takes the cache under ("layer_past" in older code)
    # the client's pieces: paths of modules in the ForCausalLM, and config values
    embed: str = "model.embed_tokens"
    final_norm: str | None = "model.norm"
    lm_head: str = "lm_head"
    embed_positions: str | None = None
    embed_norm: str | None = None
    project_in: str | None = None
    project_out: str | None = None
    embedding_multiplier: str | None = None  # config attribute
    logit_scale: str | None = None  # config attribute
    logits_scaling: str | None = None  # config attribute
    final_logit_softcapping: str | None = None  # config attribute
    #: config flags that turn the family into something else, each with the reason it is refused
    refuse: tuple[tuple[str, str], ...] = ()

    @property
    def modeling(self) -> str:
        return self.module or self.model_type


class DecoderContext(SpanContext):
    """A span's non-weight modules: the family's rotary embedding, where it has one."""

    def __init__(self, config: PretrainedConfig, rotary: type[nn.Module] | None):
        super().__init__()
        self.config = config
        self.rotary_emb = rotary(config=config) if rotary is not None else None


class DecoderFamily(FamilyAdapter):
    def __init__(self, decoder: Decoder):
        self.decoder = decoder
        self.model_types = (decoder.model_type,)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.decoder.model_type!r})"

    def check_config(self, config: PretrainedConfig) -> None:
        for flag, reason in self.decoder.refuse:
            if getattr(config, flag, False):
                raise UnsupportedArchitecture(f"{config.model_type} with {flag}={getattr(config, flag)!r} "
                                              f"is not supported: {reason}")

    # ------------------------------------------------------------------ weights

    def block_prefix(self, config: PretrainedConfig, index: int) -> str:
        return f"{self.decoder.layers}.{index}."

    def build_block(self, config: PretrainedConfig, index: int) -> nn.Module:
        with torch.device("meta"):
            block = modeling_class(self.decoder.modeling, self.decoder.layer)(config, layer_idx=index)
        checkpoint_layout_hook(block, skeleton(config), self.block_prefix(config, index))
        return block

    def _client_paths(self) -> dict[str, str | None]:
        d = self.decoder
        return dict(embed_tokens=d.embed, final_norm=d.final_norm, lm_head=d.lm_head,
                    embed_positions=d.embed_positions, embed_norm=d.embed_norm,
                    project_in=d.project_in, project_out=d.project_out)

    def _client_modules(self, model: nn.Module) -> dict[str, nn.Module | None]:
        # a path may be declared and still absent (OPT without a final norm or projections)
        return {field: _submodule(model, path) for field, path in self._client_paths().items()}

    def client_tensor_names(self, config: PretrainedConfig) -> dict[str, str]:
        model = skeleton(config)
        names = {}
        for field, module in self._client_modules(model).items():
            if module is None:
                continue
            path = self._client_paths()[field]
            for param in module.state_dict():
                names[f"{field}.{param}"] = checkpoint_name(model, f"{path}.{param}")
        if tied_head(model):  # checkpoints store a tied head once, as the embeddings
            names["lm_head.weight"] = names["embed_tokens.weight"]
        return names

    def build_client_head(self, config: PretrainedConfig) -> ClientHead:
        d = self.decoder
        modules = self._client_modules(skeleton(config))
        for module in modules.values():
            if module is not None:
                _restore_scalar_buffers(module)
        modules["final_norm"] = modules["final_norm"] or nn.Identity()
        positions = modules["embed_positions"]
        scalars = {field: getattr(config, attr) if attr else None for field, attr in (
            ("embedding_multiplier", d.embedding_multiplier), ("logit_scale", d.logit_scale),
            ("logits_scaling", d.logits_scaling), ("final_logit_softcapping", d.final_logit_softcapping))}
        return ClientHead(**modules, position_offset=getattr(positions, "offset", 0), **scalars)

    # ------------------------------------------------------------------ running

    def make_span_context(self, config: PretrainedConfig, device: torch.device) -> SpanContext:
        rotary = modeling_class(self.decoder.modeling, self.decoder.rotary) if self.decoder.rotary else None
        with torch.device(device):
            return DecoderContext(config, rotary)

    def attention_type(self, config: PretrainedConfig, index: int) -> str:
        """"full_attention" or "sliding_attention" for block `index`, as the full model decides it."""
        if self.decoder.masks == "layer_types":
            return config.layer_types[index]
        if self.decoder.masks == "sliding" and getattr(config, "sliding_window", None) is not None:
            return "sliding_attention"
        return "full_attention"

    def masks(self, config, kinds, first_block, hidden_states, attention_mask, position_ids, cache) -> dict:
        """One mask per attention type in the span, sized against a layer of this span."""
        # The cache knows the sizes of the layers it has filled: ask it about a layer of this
        # span (layer_idx), never the model's first layer, which lives on another peer.
        return {kind: MASK_BUILDERS[kind](
            config=config, inputs_embeds=hidden_states, attention_mask=attention_mask, cache=cache,
            position_ids=position_ids, layer_idx=first_block + kinds.index(kind),
        ) for kind in dict.fromkeys(kinds)}

    def block_inputs(self, context, kinds, hidden_states, attention_mask, position_ids) -> list[dict]:
        """Keyword arguments of each block besides the hidden states, mask and cache."""
        if context.rotary_emb is None:
            return [dict(position_ids=position_ids) for _ in kinds]
        if self.decoder.rotary_per_layer_type:
            tables = {kind: context.rotary_emb(hidden_states, position_ids, kind) for kind in dict.fromkeys(kinds)}
            return [dict(position_ids=position_ids, position_embeddings=tables[kind]) for kind in kinds]
        table = context.rotary_emb(hidden_states, position_ids=position_ids)
        return [dict(position_ids=position_ids, position_embeddings=table) for _ in kinds]

    def run_blocks(self, context, blocks, first_block, hidden_states, attention_mask, position_ids, cache):
        config = context.config
        kinds = [self.attention_type(config, first_block + i) for i in range(len(blocks))]
        masks = self.masks(config, kinds, first_block, hidden_states, attention_mask, position_ids, cache)
        inputs = self.block_inputs(context, kinds, hidden_states, attention_mask, position_ids)
        for block, kind, extra in zip(blocks, kinds, inputs):
            out = block(hidden_states, attention_mask=masks[kind], use_cache=True,
                        **{self.decoder.cache_arg: cache}, **extra)
            hidden_states = out[0] if isinstance(out, tuple) else out
        return hidden_states


def _submodule(model: nn.Module, path: str | None) -> nn.Module | None:
    if path is None:
        return None
    *parents, name = path.split(".")
    for parent in parents:
        model = getattr(model, parent)
    return getattr(model, name, None)


def _restore_scalar_buffers(module: nn.Module) -> None:
    """Non-persistent buffers are not in checkpoints: give back the ones built on meta (Gemma's embed_scale)."""
    for sub in module.modules():
        if hasattr(sub, "scalar_embed_scale"):  # as transformers' _init_weights does
            sub.embed_scale = torch.tensor(sub.scalar_embed_scale)
    missing = [name for name, buffer in module.named_buffers() if buffer.is_meta]
    if missing:
        raise NotImplementedError(f"client module {type(module).__name__} has buffers we cannot rebuild: {missing}")
