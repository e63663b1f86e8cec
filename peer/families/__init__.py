"""Model families MoLink can serve, one adapter per family (or per shared mechanism)."""

from __future__ import annotations

from transformers import PretrainedConfig

from molink.peer.families.base import ClientHead, FamilyAdapter, SpanContext, UnsupportedArchitecture
from molink.peer.families.llama import LlamaFamily

_ADAPTERS: list[FamilyAdapter] = [LlamaFamily()]
FAMILIES: dict[str, FamilyAdapter] = {t: a for a in _ADAPTERS for t in a.model_types}


def supported_model_types() -> list[str]:
    return sorted(FAMILIES)


def get_family(config: PretrainedConfig) -> FamilyAdapter:
    adapter = FAMILIES.get(getattr(config, "model_type", None))
    if adapter is None:
        raise UnsupportedArchitecture(
            f"model type {getattr(config, 'model_type', None)!r} is not supported; "
            f"supported: {', '.join(supported_model_types())}"
        )
    return adapter


__all__ = [
    "ClientHead",
    "FAMILIES",
    "FamilyAdapter",
    "SpanContext",
    "UnsupportedArchitecture",
    "get_family",
    "supported_model_types",
]
