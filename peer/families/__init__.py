"""Model families MoLink can serve: one declaration per family (catalog.py), one adapter per mechanism."""

from __future__ import annotations

import logging

from transformers import PretrainedConfig

from molink.peer.families.base import ClientHead, FamilyAdapter, SpanContext, UnsupportedArchitecture
from molink.peer.families.catalog import ADAPTERS

logger = logging.getLogger(__name__)

_ADAPTERS: list[FamilyAdapter] = ADAPTERS
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
    adapter.check_config(config)
    return adapter


def use_reference_kernels(config: PretrainedConfig) -> PretrainedConfig:
    """Set the attention and MoE-experts kernels transformers' `from_pretrained` would use for this
    model (sdpa where the model supports it, else eager; grouped_mm for MoE experts), so spans
    compute what the full model computes. Unsupported models are left alone: get_family says why."""
    if getattr(config, "model_type", None) in FAMILIES:
        from molink.peer.families.common import reference_kernels

        try:
            config._attn_implementation, config._experts_implementation = reference_kernels(config)
        except Exception as exc:  # noqa: BLE001 - a config transformers cannot build: say so, keep sdpa
            logger.warning("cannot ask transformers which kernels %s uses (%s); using sdpa", config.model_type, exc)
            config._attn_implementation = "sdpa"
    return config


__all__ = [
    "ClientHead",
    "FAMILIES",
    "FamilyAdapter",
    "SpanContext",
    "UnsupportedArchitecture",
    "get_family",
    "supported_model_types",
    "use_reference_kernels",
]
