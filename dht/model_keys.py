"""The per-model DHT key space: a model's name, config and weights make its key, so peers serving
other weights (a fine-tune with the same config) or another config never see each other.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path
from typing import Any

MODEL_KEY_HEX_CHARS = 40  # 160 bits: collisions need ~2^80 work


# Config fields that differ between installs of the same weights and must not split the swarm.
VOLATILE_CONFIG_KEYS = frozenset({
    "transformers_version", "torch_dtype", "dtype", "use_cache", "output_attentions",
    "output_hidden_states", "return_dict", "attn_implementation",
})


def model_dht_key(model_name: str, config_dict: dict[str, Any], weights_fingerprint: str) -> str:
    """The per-model key space: sha256 over name, canonical config and weights, 40 hex chars.

    Peers serving other weights (a fine-tune with the same config) or another config land in
    another key space and never see each other. Keys starting with "_" and VOLATILE_CONFIG_KEYS
    are dropped so paths, versions and runtime switches do not split one model into many.
    """
    config = {k: v for k, v in config_dict.items()
              if not k.startswith("_") and k not in VOLATILE_CONFIG_KEYS}
    canonical = json.dumps({"name": model_name, "config": config, "weights": weights_fingerprint},
                           sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=str)
    digest = hashlib.sha256(b"molink-model-key/v1\x00" + canonical.encode()).hexdigest()
    return digest[:MODEL_KEY_HEX_CHARS]


_SAMPLE_BYTES = 4096
_MAX_HEADER_BYTES = 100 * 1024 * 1024  # the limit safetensors itself enforces


def weights_fingerprint(model_dir: str | Path) -> str:
    """A cheap fingerprint of the *.safetensors files in `model_dir` (sha256 hex).

    Hashes, per file in name order: name, size, the JSON header (names, dtypes, shapes, offsets),
    and per tensor two 4 KiB samples of its data (its first bytes and those from its middle).
    Headers alone cannot tell a fine-tune from its base (same shapes, same sizes); the samples
    do, because fine-tuning changes every tensor it touches, and reading ~8 KiB per tensor costs
    milliseconds even for a 70B checkpoint (~1k tensors) instead of minutes for a full hash.
    """
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {model_dir}")
    h = hashlib.sha256(b"molink-weights/v1\x00")
    for path in files:
        size = path.stat().st_size
        h.update(path.name.encode() + b"\x00" + struct.pack("<Q", size))
        with path.open("rb") as f:
            head = f.read(8)
            if len(head) != 8:
                raise ValueError(f"{path} is not a safetensors file")
            (n,) = struct.unpack("<Q", head)
            if n > min(_MAX_HEADER_BYTES, size - 8):
                raise ValueError(f"{path} has a bad safetensors header length")
            header_bytes = f.read(n)
            h.update(header_bytes)
            try:
                header = json.loads(header_bytes)
                spans = sorted((int(v["data_offsets"][0]), int(v["data_offsets"][1]))
                               for k, v in header.items() if k != "__metadata__")
            except (ValueError, TypeError, KeyError, IndexError, AttributeError) as exc:
                raise ValueError(f"{path} has a malformed safetensors header") from exc
            base = 8 + n
            for begin, end in spans:
                if not 0 <= begin <= end <= size - base:
                    raise ValueError(f"{path} has tensor offsets outside the file")
                for offset in (begin, begin + (end - begin) // 2):
                    f.seek(base + offset)
                    h.update(f.read(min(_SAMPLE_BYTES, end - offset)))
    return h.hexdigest()
