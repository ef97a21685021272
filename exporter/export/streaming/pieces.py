"""The modules traced by the streaming export: prefix, one decoder layer, suffix.

Each wrapper calls the HF model's own code (embedding, `create_causal_mask` through the model's
forward, rotary embedding, the decoder layer, final norm, LM head), so each piece computes exactly
what the same part of `DecoderWithPastForExport` computes. The wrappers hold their modules under the
whole model's attribute path (`model.model.layers.{i}`), so TorchScript names the nodes as in the
whole-model export and the graph passes number layers the same way.

Tensors between pieces have fixed names (`HIDDEN`, `COS`, `SIN`, `mask_name`), the piece graphs'
inputs and outputs, so stitching connects them by name.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import DynamicCache

from exporter.export.decoder_with_past import past_names, present_names

EMBEDS = "streaming.inputs_embeds"
COS, SIN = "streaming.cos", "streaming.sin"


def hidden_name(layer: int) -> str:
    """The hidden state leaving decoder layer `layer`."""
    return f"streaming.hidden.{layer}"


def mask_name(index: int) -> str:
    """The `index`-th distinct causal mask (one per attention type: full, sliding window)."""
    return f"streaming.mask.{index}"


BATCH_SEQ = {0: "batch_size", 1: "sequence_length"}
MASK_AXES = {0: "batch_size", 2: "sequence_length", 3: "total_sequence_length"}
PAST_AXES = {0: "batch_size", 2: "past_sequence_length"}
PRESENT_AXES = {0: "batch_size", 2: "total_sequence_length"}


class _Capture(nn.Module):
    """Stands in for decoder layer: records the mask and rotary embedding the model hands it."""

    def __init__(self, attention_type: str | None, sink: list[tuple[Any, Any, Any]]) -> None:
        super().__init__()
        if attention_type is not None:
            self.attention_type = attention_type
        self._sink = sink

    def forward(self, hidden_states, attention_mask=None, position_embeddings=None, **kwargs):  # type: ignore[no-untyped-def]
        self._sink.append((hidden_states, attention_mask, position_embeddings))
        return hidden_states


class PrefixForExport(nn.Module):
    """(input_ids, attention_mask, position_ids, past of the first cache layer) -> (inputs_embeds, cos,
    sin, *distinct masks): the model's forward with every decoder layer replaced by a capture.

    `shell` is the causal LM with real embeddings, rotary embedding and norm; its layers are replaced
    here. The past is only read for its length (the mask's key axis), as in the whole model."""

    def __init__(self, shell: nn.Module, attention_types: list[str | None]) -> None:
        super().__init__()
        self._sink: list[tuple[Any, Any, Any]] = []
        shell.model.layers = nn.ModuleList([_Capture(t, self._sink) for t in attention_types])
        self.model = shell
        self.mask_of_layer: list[int | None] = []  # filled by each forward: layer -> distinct mask index

    def forward(self, input_ids, attention_mask, position_ids, past):  # type: ignore[no-untyped-def]
        cache = DynamicCache()
        cache.update(past, past, 0)
        self._sink.clear()
        self.model.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=True,
        )
        masks: list[torch.Tensor] = []
        self.mask_of_layer = []
        for _, mask, _ in self._sink:
            if mask is None:
                self.mask_of_layer.append(None)
                continue
            index = next((k for k, m in enumerate(masks) if m is mask), None)
            if index is None:
                masks.append(mask)
                index = len(masks) - 1
            self.mask_of_layer.append(index)
        embeds, _, (cos, sin) = self._sink[0]
        return (embeds, cos, sin, *masks)

    def names(self, first_cache_layer: int) -> tuple[list[str], list[str], dict[str, dict[int, str]]]:
        """Input names, output names and dynamic axes (after one forward: the masks are counted then)."""
        inputs = ["input_ids", "attention_mask", "position_ids", past_names(first_cache_layer)[0]]
        n_masks = len({m for m in self.mask_of_layer if m is not None})
        outputs = [EMBEDS, COS, SIN, *(mask_name(k) for k in range(n_masks))]
        axes = {
            "input_ids": BATCH_SEQ,
            "attention_mask": {0: "batch_size", 1: "total_sequence_length"},
            "position_ids": BATCH_SEQ,
            EMBEDS: BATCH_SEQ,
            COS: BATCH_SEQ,
            SIN: BATCH_SEQ,
            past_names(first_cache_layer)[0]: PAST_AXES,
            **{mask_name(k): MASK_AXES for k in range(n_masks)},
        }
        return inputs, outputs, axes


def _at_path(index: int, layer: nn.Module) -> nn.Module:
    """`layer` as `model.model.layers.{index}` of a fresh holder (the whole model's module path)."""
    inner = nn.Module()
    inner.layers = nn.ModuleList([nn.Identity() for _ in range(index)] + [layer])
    outer = nn.Module()
    outer.model = inner
    return outer


class LayerForExport(nn.Module):
    """(hidden, [mask], cos, sin, position_ids, [past key, past value]) -> (hidden, [present key, value]).

    One decoder layer with a one-slot cache: its attention (if it kept one) writes slot 0 here, as
    slot = its rank among the cache layers in the whole model; the mask is the one the model hands
    this layer (`mask_index`), absent when the model hands none."""

    def __init__(self, layer: nn.Module, index: int, mask_index: int | None) -> None:
        super().__init__()
        self.index = index
        self.mask_index = mask_index
        self.has_attention = getattr(layer, "self_attn", None) is not None
        self.model = _at_path(index, layer)

    @property
    def layer(self) -> nn.Module:
        layer: nn.Module = self.model.model.layers[self.index]
        return layer

    def forward(self, hidden, *args):  # type: ignore[no-untyped-def]
        args = list(args)
        mask = args.pop(0) if self.mask_index is not None else None
        cos, sin, position_ids = args[:3]
        cache = None
        if self.has_attention:
            self.layer.self_attn.layer_idx = 0
            cache = DynamicCache()
            cache.update(args[3], args[4], 0)
        out = self.layer(
            hidden,
            attention_mask=mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=True,
            position_embeddings=(cos, sin),
        )
        if cache is None:
            return (out,)
        return (out, cache.layers[0].keys, cache.layers[0].values)

    def names(self, input_hidden: str) -> tuple[list[str], list[str], dict[str, dict[int, str]]]:
        inputs = [input_hidden] + ([mask_name(self.mask_index)] if self.mask_index is not None else [])
        inputs += [COS, SIN, "position_ids"]
        outputs = [hidden_name(self.index)]
        axes: dict[str, dict[int, str]] = {input_hidden: BATCH_SEQ, outputs[0]: BATCH_SEQ, COS: BATCH_SEQ}
        axes.update({SIN: BATCH_SEQ, "position_ids": BATCH_SEQ})
        if self.mask_index is not None:
            axes[mask_name(self.mask_index)] = MASK_AXES
        if self.has_attention:
            inputs += list(past_names(self.index))
            outputs += list(present_names(self.index))
            axes.update({name: PAST_AXES for name in past_names(self.index)})
            axes.update({name: PRESENT_AXES for name in present_names(self.index)})
        return inputs, outputs, axes


class SuffixForExport(nn.Module):
    """hidden -> logits: the final norm and the LM head, under the whole model's module paths."""

    def __init__(self, norm: nn.Module, lm_head: nn.Module) -> None:
        super().__init__()
        inner = nn.Module()
        inner.norm = norm
        holder = nn.Module()
        holder.model = inner
        holder.lm_head = lm_head
        self.model = holder

    def forward(self, hidden):  # type: ignore[no-untyped-def]
        return self.model.lm_head(self.model.model.norm(hidden))

    def names(self, input_hidden: str) -> tuple[list[str], list[str], dict[str, dict[int, str]]]:
        return [input_hidden], ["logits"], {input_hidden: BATCH_SEQ, "logits": BATCH_SEQ}
