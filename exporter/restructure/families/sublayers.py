"""Layers with whole sublayers removed: what is left computes exactly what the masked layer did.

A sublayer whose units are all dead outputs a constant for every token: its output bias plus the
folded constants of its dead units (a value-dead head's W_o·b_v, a constant neuron's act(b_gate)·b_up or
act(b₁)·W₂[:, j]); zero when there are none. So:
- pre-norm decoders (Llama, Mistral, Qwen2): `h + sublayer(norm(h))` becomes `h + c` (or `h`): the
  norm, the projections and, for attention, the KV cache are gone (`CompactDecoderLayer`);
- post-norm BERT: `LayerNorm(h + sublayer(h))` becomes `LayerNorm(h + c)`: only what the LayerNorm
  needs is kept (`ConstantResidualNorm`; graph_passes/fold_residual_bias.py then moves c into the
  LayerNorm that produced h, when nothing else reads h).
The constants are parameters named `attn_residual_bias` / `mlp_residual_bias` (decoders) and
`residual_bias` (BERT), so the compact checkpoint holds them.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def _constant(value: torch.Tensor | None) -> nn.Parameter | None:
    return None if value is None else nn.Parameter(value.detach().clone(), requires_grad=False)


class CompactDecoderLayer(nn.Module):
    """A Llama / Mistral / Qwen2 decoder layer whose attention and / or MLP may be gone.

    Same call signature and submodule names as the HF layers (`input_layernorm`, `self_attn`,
    `post_attention_layernorm`, `mlp`), so the HF model loop, its cache and the checkpoint names are
    unchanged for what is kept. A layer without attention never touches the cache."""

    def __init__(
        self,
        layer: nn.Module,
        *,
        attention: bool,
        mlp: bool,
        attn_constant: torch.Tensor | None = None,
        mlp_constant: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.input_layernorm = layer.input_layernorm if attention else None
        self.self_attn = layer.self_attn if attention else None
        self.post_attention_layernorm = layer.post_attention_layernorm if mlp else None
        self.mlp = layer.mlp if mlp else None
        self.attn_residual_bias = _constant(attn_constant) if not attention else None
        self.mlp_residual_bias = _constant(mlp_constant) if not mlp else None
        if hasattr(layer, "attention_type"):
            self.attention_type = layer.attention_type

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: Any = None,
        use_cache: bool | None = False,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        if self.self_attn is not None:
            assert self.input_layernorm is not None
            attended, _ = self.self_attn(
                hidden_states=self.input_layernorm(hidden_states),
                attention_mask=attention_mask,
                position_ids=position_ids,
                cache=cache,
                use_cache=use_cache,
                position_embeddings=position_embeddings,
                **kwargs,
            )
            hidden_states = hidden_states + attended
        elif self.attn_residual_bias is not None:
            hidden_states = hidden_states + self.attn_residual_bias
        if self.mlp is not None:
            assert self.post_attention_layernorm is not None
            hidden_states = hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))
        elif self.mlp_residual_bias is not None:
            hidden_states = hidden_states + self.mlp_residual_bias
        return hidden_states


class ConstantResidualNorm(nn.Module):
    """BERT's `LayerNorm(sublayer(h) + h)` for a removed sublayer: `LayerNorm(h + c)`.

    Called like the module it replaces: `BertSelfOutput` / `BertOutput` as `(hidden, input_tensor)`,
    where `hidden` (what the removed projections would have read) is ignored."""

    def __init__(self, layer_norm: nn.Module, constant: torch.Tensor | None) -> None:
        super().__init__()
        self.LayerNorm = layer_norm  # the HF name, so the checkpoint keys stay the same
        self.residual_bias = _constant(constant)

    def forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor | None = None) -> torch.Tensor:
        residual = hidden_states if input_tensor is None else input_tensor
        if self.residual_bias is not None:
            residual = residual + self.residual_bias
        return self.LayerNorm(residual)


class RemovedBertAttention(nn.Module):
    """`BertAttention` without heads: `LayerNorm(h + c)`, returned as HF's (output, attention weights)."""

    def __init__(self, layer_norm: nn.Module, constant: torch.Tensor | None) -> None:
        super().__init__()
        self.output = ConstantResidualNorm(layer_norm, constant)

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, None]:
        return self.output(hidden_states), None
