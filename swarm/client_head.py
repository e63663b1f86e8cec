"""Load the client-side pieces of a model (embeddings, final norm, lm_head) and nothing else."""

from __future__ import annotations

from pathlib import Path

import torch

from molink.peer.checkpoint import Checkpoint, load_config
from molink.peer.families import ClientHead, get_family


def load_client_head(model_dir: str | Path, dtype: torch.dtype = torch.float32,
                     device: str | torch.device = "cpu") -> ClientHead:
    config = load_config(model_dir)
    family = get_family(config)
    head = family.build_client_head(config)
    names = family.client_tensor_names(config)
    tensors = Checkpoint.open(model_dir).load(sorted(set(names.values())), dtype=dtype, device=device)
    for module_path, tensor_name in names.items():
        module_name, param_name = module_path.rsplit(".", 1)
        module = getattr(head, module_name)
        materialize_param(module, param_name, tensors[tensor_name])
    for module in head.modules():
        module.train(False).requires_grad_(False)  # inference mode (no dropout)
    return head


def materialize_param(module: torch.nn.Module, name: str, tensor: torch.Tensor) -> None:
    # Tied weights share one tensor: assign the same storage, as transformers does.
    setattr(module, name, torch.nn.Parameter(tensor, requires_grad=False))
