"""The DHT key space of one model: its name + a fingerprint of its config and weights.

Peers and clients compute it from their own copy of the checkpoint, so a peer serving other
weights (a fine-tune, a corrupted download) lands in another key space and is never routed to.
"""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path

from molink.dht.model_keys import model_dht_key, weights_fingerprint
from molink.peer.checkpoint import load_config


def model_name_of(model_dir: Path) -> str:
    """`org/name` for a hub snapshot (…/models--org--name/snapshots/<rev>), else the folder name."""
    match = re.search(r"models--([^/]+?)--([^/]+)/snapshots/", str(model_dir))
    return f"{match.group(1)}/{match.group(2)}" if match else Path(model_dir).resolve().name


@lru_cache(maxsize=16)
def model_key_for(model_dir: str | Path, name: str | None = None) -> str:
    model_dir = Path(model_dir)
    config = load_config(model_dir)
    return model_dht_key(name or model_name_of(model_dir), config.to_dict(), weights_fingerprint(model_dir))
