"""The seam between MoLink and one model family: what a span of blocks and the client need.

A family adapter answers four questions for the rest of the system:
- which checkpoint tensors belong to block i, and which to the client (embeddings, final norm, head);
- how to build block i's module (empty, on the meta device, to be filled from safetensors);
- how a span runs its blocks: positions (rotary / ALiBi / learned), masks (causal / sliding), cache;
- how the client turns tokens into hidden states and hidden states into logits.
Everything else (loading, sessions, the network) is family-agnostic.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PretrainedConfig


class UnsupportedArchitecture(ValueError):
    """The model's architecture has no adapter here."""


@dataclass
class ClientHead:
    """The client-side pieces: token embeddings in, logits out."""

    embed_tokens: nn.Module
    final_norm: nn.Module
    lm_head: nn.Module

    @torch.inference_mode()
    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    @torch.inference_mode()
    def logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.final_norm(hidden_states))


class FamilyAdapter(ABC):
    """One model family (or one shared mechanism serving several model types)."""

    #: `config.model_type` values this adapter serves
    model_types: tuple[str, ...] = ()

    @abstractmethod
    def block_prefix(self, config: PretrainedConfig, index: int) -> str:
        """Checkpoint name prefix of block `index` (e.g. "model.layers.3.")."""

    @abstractmethod
    def client_tensor_names(self, config: PretrainedConfig) -> dict[str, str]:
        """Module path in the client head -> checkpoint tensor name."""

    @abstractmethod
    def build_block(self, config: PretrainedConfig, index: int) -> nn.Module:
        """Block `index` with its real class, parameters on the meta device."""

    @abstractmethod
    def build_client_head(self, config: PretrainedConfig) -> ClientHead:
        """The client head with parameters on the meta device."""

    @abstractmethod
    def make_span_context(self, config: PretrainedConfig, device: torch.device) -> "SpanContext":
        """Per-span helpers that are not weights (rotary tables and the like)."""

    @abstractmethod
    def run_blocks(
        self,
        context: "SpanContext",
        blocks: list[nn.Module],
        first_block: int,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        cache,
    ) -> torch.Tensor:
        """Run `blocks` (global indices first_block...) over new tokens; caches grow in place.

        attention_mask: [batch, past + new] 0/1 for all tokens the session has seen, this step included.
        position_ids: [batch, new] positions of the new tokens.
        """


class SpanContext(nn.Module):
    """Holder for a span's non-weight modules, so `.to(device)` moves them together."""
