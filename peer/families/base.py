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
    """The client-side pieces: token embeddings in, logits out.

    `embed_tokens`, `final_norm` and `lm_head` are there for every family; the optional pieces are
    what some families do between the embeddings and the first block, or after the last block,
    applied in the order of the fields (each reproduces one line of that family's own forward).
    Learned absolute positions live here, on the client: `embed` then needs `position_ids`, which
    the client computes from its own attention mask exactly like the peers do (`positions_from_mask`).
    """

    embed_tokens: nn.Module
    final_norm: nn.Module
    lm_head: nn.Module
    embedding_multiplier: float | None = None  # Granite: embeddings * embedding_multiplier
    project_in: nn.Module | None = None  # OPT with word_embed_proj_dim != hidden_size
    embed_positions: nn.Module | None = None  # learned absolute positions (GPT-2, OPT)
    position_offset: int = 0  # OPT looks its positions up at position + 2
    embed_norm: nn.Module | None = None  # BLOOM: LayerNorm right after the embeddings
    project_out: nn.Module | None = None  # OPT, after the final norm
    logit_scale: float | None = None  # Cohere: logits * logit_scale
    logits_scaling: float | None = None  # Granite: logits / logits_scaling
    final_logit_softcapping: float | None = None  # Gemma2/3: tanh(logits / cap) * cap

    @property
    def needs_positions(self) -> bool:
        return self.embed_positions is not None

    def modules(self) -> list[nn.Module]:
        return [m for m in vars(self).values() if isinstance(m, nn.Module)]

    @torch.inference_mode()
    def embed(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)
        if self.embedding_multiplier is not None:
            hidden = hidden * self.embedding_multiplier
        if self.project_in is not None:
            hidden = self.project_in(hidden)
        if self.embed_positions is not None:
            if position_ids is None:
                raise ValueError("this model has learned absolute positions: embed() needs position_ids")
            hidden = hidden + nn.Embedding.forward(self.embed_positions, position_ids + self.position_offset)
        if self.embed_norm is not None:
            hidden = self.embed_norm(hidden)
        return hidden

    @torch.inference_mode()
    def logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = self.final_norm(hidden_states)
        if self.project_out is not None:
            hidden_states = self.project_out(hidden_states)
        logits = self.lm_head(hidden_states)
        if self.logit_scale is not None:
            logits = logits * self.logit_scale
        if self.logits_scaling is not None:
            logits = logits / self.logits_scaling
        if self.final_logit_softcapping is not None:
            logits = torch.tanh(logits / self.final_logit_softcapping) * self.final_logit_softcapping
        return logits


class FamilyAdapter(ABC):
    """One model family (or one shared mechanism serving several model types)."""

    #: `config.model_type` values this adapter serves
    model_types: tuple[str, ...] = ()

    def check_config(self, config: PretrainedConfig) -> None:
        """Raise UnsupportedArchitecture for variants of the family this adapter cannot run exactly."""

    @abstractmethod
    def block_prefix(self, config: PretrainedConfig, index: int) -> str:
        """Checkpoint name prefix of block `index` (e.g. "model.layers.3.")."""

    @abstractmethod
    def client_tensor_names(self, config: PretrainedConfig) -> dict[str, str]:
        """Module path in the client head -> checkpoint tensor name."""

    @abstractmethod
    def build_block(self, config: PretrainedConfig, index: int) -> nn.Module:
        """Block `index` with its real class, parameters on the meta device.

        `checkpoint.materialize` fills it with `load_state_dict`: a family whose checkpoints keep
        another layout (MoE experts stored one by one) converts them in a load_state_dict pre-hook.
        """

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
