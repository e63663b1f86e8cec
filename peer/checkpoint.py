"""Reading a model checkpoint piece by piece: only the tensors a peer or client needs.

Tensors are read from safetensors files with `safe_open` (memory-mapped). The files are opened
once per group of tensors (one block at a time) and closed after it, so the mapped pages a
process touches never add up to more than one block beyond the tensors it keeps: peak memory
follows the span, not the model.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoConfig, PretrainedConfig

from molink.peer.families import use_reference_kernels

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
DOWNLOAD_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]


class CheckpointError(Exception):
    """The checkpoint is missing, incomplete or not in safetensors format."""


def resolve_model_dir(path_or_id: str | os.PathLike) -> Path:
    """A local directory as is; otherwise a hub id, downloaded (safetensors only) for users with network."""
    path = Path(path_or_id).expanduser()
    if path.is_dir():
        return path
    if str(path_or_id).startswith((".", "/", "~")) or not str(path_or_id).count("/") == 1:
        raise CheckpointError(f"model directory {path_or_id} does not exist")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(path_or_id), allow_patterns=DOWNLOAD_PATTERNS))
    except Exception as exc:  # offline, unknown repo, gated model: say which, plainly
        raise CheckpointError(f"cannot fetch {path_or_id!r} from the hub: {exc}") from exc


def load_config(model_dir: str | os.PathLike) -> PretrainedConfig:
    config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    # Spans use the kernels the reference model loads with (sdpa or eager, MoE experts kernel),
    # so outputs match exactly.
    return use_reference_kernels(config)


@dataclass
class Checkpoint:
    """Where every tensor of a safetensors checkpoint lives."""

    model_dir: Path
    weight_map: dict[str, str]  # tensor name -> file name

    @classmethod
    def open(cls, model_dir: str | os.PathLike) -> "Checkpoint":
        model_dir = Path(model_dir)
        index = model_dir / INDEX_FILE
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
        elif (model_dir / SINGLE_FILE).exists():
            with safe_open(model_dir / SINGLE_FILE, framework="pt") as f:
                weight_map = {name: SINGLE_FILE for name in f.keys()}
        else:
            raise CheckpointError(f"{model_dir} has no {SINGLE_FILE} or {INDEX_FILE}")
        return cls(model_dir, weight_map)

    def names_with_prefix(self, prefix: str) -> list[str]:
        return sorted(name for name in self.weight_map if name.startswith(prefix))

    def load(self, names: list[str], dtype: torch.dtype | None = None,
             device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
        """Read `names` (and nothing else), converting to `dtype` and moving to `device`."""
        missing = [n for n in names if n not in self.weight_map]
        if missing:
            raise CheckpointError(f"checkpoint in {self.model_dir} lacks tensors: {missing[:5]}")
        by_file: dict[str, list[str]] = defaultdict(list)
        for name in names:
            by_file[self.weight_map[name]].append(name)
        tensors = {}
        for file_name, file_names in by_file.items():
            with safe_open(self.model_dir / file_name, framework="pt", device="cpu") as f:
                for name in file_names:
                    tensor = f.get_tensor(name)
                    if dtype is not None and tensor.is_floating_point():
                        tensor = tensor.to(dtype)
                    tensors[name] = tensor.to(device)
        return tensors

    def total_bytes(self, names: list[str]) -> int:
        total = 0
        by_file: dict[str, list[str]] = defaultdict(list)
        for name in names:
            by_file[self.weight_map[name]].append(name)
        for file_name, file_names in by_file.items():
            with safe_open(self.model_dir / file_name, framework="pt") as f:
                for name in file_names:
                    sl = f.get_slice(name)
                    numel = 1
                    for d in sl.get_shape():
                        numel *= d
                    total += numel * _DTYPE_SIZES.get(sl.get_dtype(), 4)
        return total


_DTYPE_SIZES = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8, "I64": 8, "I32": 4, "I8": 1, "U8": 1, "BOOL": 1}


def materialize(module: torch.nn.Module, tensors: dict[str, torch.Tensor], prefix: str = "") -> None:
    """Fill a meta-device module from checkpoint tensors; every parameter must be covered.

    The tensors go through the module's `load_state_dict` pre-hooks, where a family adapter turns a
    checkpoint layout of its own (MoE experts stored one tensor per expert) into the module's.
    """
    state = {name[len(prefix):]: t for name, t in tensors.items() if name.startswith(prefix)}
    try:
        module.load_state_dict(state, assign=True, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"tensors for {prefix or 'module'} do not match its parameters: {exc}") from exc
