"""What every family adapter borrows from transformers itself, so a span matches the full model.

- `modeling_class`: a family's own classes (decoder layer, rotary embedding, ...), by name.
- `skeleton`: the family's `ForCausalLM` with no blocks, on the meta device. It costs nothing and
  answers, the way transformers answers them, what the client pieces are (their exact classes and
  options), whether the head is tied to the embeddings, and which kernels `from_pretrained` picks.
- `reference_kernels`: the attention (sdpa / eager) and MoE-experts kernels of the reference
  model: spans must run the same ones (Gemma2 and BLOOM are eager-only, MoE blocks need an
  experts kernel).
- `checkpoint_layout_hook`: checkpoints keep the layout of the original release (Mixtral's
  `block_sparse_moe.experts.3.w1`, Qwen-MoE's one tensor per expert, GPT-NeoX's `embed_out`);
  transformers converts them while loading. A block converts its own tensors the same way, with
  transformers' conversion rules, in a standard `load_state_dict` pre-hook.
"""

from __future__ import annotations

import copy
import importlib
from functools import partial

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PretrainedConfig


def modeling_class(module: str, name: str) -> type[nn.Module]:
    """Class `name` of transformers.models.<module>.modeling_<module>."""
    return getattr(importlib.import_module(f"transformers.models.{module}.modeling_{module}"), name)


def skeleton(config: PretrainedConfig) -> nn.Module:
    """The model's ForCausalLM with zero blocks, parameters on the meta device."""
    config = copy.deepcopy(config)
    config.num_hidden_layers = 0
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = []
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def reference_kernels(config: PretrainedConfig) -> tuple[str, str | None]:
    """(attention, experts) implementations `from_pretrained` would choose for this model."""
    resolved = skeleton(config).config
    return resolved._attn_implementation, getattr(resolved, "_experts_implementation", None)


def tied_head(model: nn.Module) -> bool:
    """Does the model's lm_head share the input embeddings' weight (tie_word_embeddings)?"""
    return model.get_output_embeddings().weight is model.get_input_embeddings().weight


def _transforms(model: nn.Module, add_legacy: bool = True):
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming

    transforms = get_model_conversion_mapping(model, add_legacy=add_legacy) or []
    return ([t for t in transforms if isinstance(t, WeightRenaming)],
            [t for t in transforms if isinstance(t, WeightConverter)])


def checkpoint_name(model: nn.Module, name: str) -> str:
    """The name a parameter of `model` has in checkpoints (save_pretrained's renaming, e.g. embed_out)."""
    from transformers.core_model_loading import rename_source_key

    renamings, _ = _transforms(model, add_legacy=False)
    reverse = [r.reverse_transform() for r in renamings[::-1]]
    return rename_source_key(name, reverse, [], reverse=True)[0]


def to_module_layout(model: nn.Module, tensors: dict[str, torch.Tensor], targets: set[str]) -> dict[str, torch.Tensor]:
    """Checkpoint tensors (full names) -> `targets` (full module names), converted as from_pretrained does."""
    from transformers.core_model_loading import WeightRenaming, dot_natural_key, rename_source_key

    renamings, converters = _transforms(model)
    by_pattern = {pattern: c for c in converters for pattern in c.source_patterns}
    pending = {}
    for name, tensor in sorted(tensors.items(), key=lambda kv: dot_natural_key(kv[0])):
        target, pattern = rename_source_key(name, renamings, converters)
        if target not in targets and name in targets:
            target, pattern = name, None
        if pattern is None:
            pending.setdefault(target, WeightRenaming(name, target)).add_tensor(target, name, name, tensor)
        else:
            pending.setdefault(target, copy.deepcopy(by_pattern[pattern])).add_tensor(target, name, pattern, tensor)
    out = {}
    for target, transform in pending.items():
        for key, value in transform.convert(target, model=model, config=model.config).items():
            out[key] = value[0] if isinstance(value, list) else value
    return out


def checkpoint_layout_hook(block: nn.Module, model: nn.Module, prefix: str) -> None:
    """Let `block` (checkpoint prefix `prefix`) load its tensors in the checkpoint's own layout."""
    targets = {prefix + name for name in block.state_dict()}
    block.register_load_state_dict_pre_hook(partial(_convert_on_load, model=model, prefix=prefix, targets=targets))


def _convert_on_load(module, state_dict, local_prefix, *args, model, prefix, targets) -> None:
    names = [k for k in state_dict if k.startswith(local_prefix)]
    if {prefix + k[len(local_prefix):] for k in names} == targets:
        return  # already in the module's layout
    tensors = {prefix + k[len(local_prefix):]: state_dict.pop(k) for k in names}
    for name, tensor in to_module_layout(model, tensors, targets).items():
        state_dict[local_prefix + name[len(prefix):]] = tensor
