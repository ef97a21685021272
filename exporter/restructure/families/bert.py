"""BERT-style encoders (bert, roberta): heads and FFN neurons of each layer.

Dead structure, found in the effective (merged, masked) weights:
- a head whose columns of the attention output projection are all zero contributes nothing;
- a head whose value rows are all zero outputs its value bias b_v for every token (softmax rows sum
  to 1), so it contributes the constant W_o[:, head] @ b_v: folded into the output bias, then removed;
- an FFN neuron whose output column is zero contributes nothing;
- an FFN neuron whose input row is zero outputs act(b_1) for every token: act(b_1) * W_2[:, j] is
  folded into the output bias, then removed.
A layer whose units all die keeps one unit whose output-projection weights are zeroed (it then
contributes exactly nothing and its constant is folded), so the HF module structure still holds.
"""

from __future__ import annotations

import torch
from torch import nn

from exporter.restructure.families._linear import (
    bias_or_zeros,
    empty_linear,
    head_slices,
    linear_params,
    sliced_linear,
    zero_cols,
    zero_rows,
)
from exporter.restructure.plan import LayerPlan, LayerShapes

MODEL_TYPES = ("bert", "roberta")


def base_model(model: nn.Module) -> nn.Module:
    return getattr(model, getattr(model, "base_model_prefix", ""), model)


def layers(model: nn.Module) -> list[nn.Module]:
    return list(base_model(model).encoder.layer)


def head_dim(model: nn.Module) -> int:
    return int(layers(model)[0].attention.self.attention_head_size)


def _linears(layer: nn.Module) -> tuple[nn.Linear, ...]:
    attn = layer.attention.self
    return (
        attn.query,
        attn.key,
        attn.value,
        layer.attention.output.dense,
        layer.intermediate.dense,
        layer.output.dense,
    )


def plan_layer(layer: nn.Module, index: int, hd: int) -> LayerPlan:
    attn, out_proj = layer.attention.self, layer.attention.output.dense
    inter, down = layer.intermediate.dense, layer.output.dense
    n_heads = attn.query.out_features // hd
    o_dead = zero_cols(out_proj.weight).view(n_heads, hd).all(dim=1)
    v_dead = zero_rows(attn.value.weight).view(n_heads, hd).all(dim=1)
    removed: dict[str, int] = {}
    notes: list[str] = []
    heads_kept = [h for h in range(n_heads) if not (o_dead[h] or v_dead[h])]
    _count(removed, "heads: zero output-projection columns", int(o_dead.sum()))
    _count(removed, "heads: zero value rows (value bias folded)", int((v_dead & ~o_dead).sum()))
    if not heads_kept:
        heads_kept = [0]
        notes.append("all heads dead: head 0 kept as a zero unit (output columns zeroed, constants folded)")
        _count(removed, _first_reason(removed, "heads"), -1)

    out_dead = zero_cols(down.weight)
    in_dead = zero_rows(inter.weight)
    neurons_kept = [j for j in range(inter.out_features) if not (out_dead[j] or in_dead[j])]
    _count(removed, "ffn neurons: zero output column", int(out_dead.sum()))
    _count(removed, "ffn neurons: zero input row (act(bias) folded)", int((in_dead & ~out_dead).sum()))
    if not neurons_kept:
        neurons_kept = [0]
        notes.append("all FFN neurons dead: neuron 0 kept as a zero unit (output column zeroed)")
        _count(removed, _first_reason(removed, "ffn"), -1)

    shapes = LayerShapes(
        heads=len(heads_kept),
        kv_heads=None,
        ffn=len(neurons_kept),
        attn_out_bias=out_proj.bias is not None,
        ffn_out_bias=down.bias is not None,
    )
    return LayerPlan(
        index, heads_kept, None, neurons_kept, removed, notes, shapes, linear_params(*_linears(layer))
    )


def apply_layer(layer: nn.Module, plan: LayerPlan, hd: int) -> None:
    """Fold the constants of dead units into the next biases, then slice to the kept units."""
    attn, attn_out = layer.attention.self, layer.attention.output
    inter, ffn_out = layer.intermediate, layer.output
    n_heads = attn.query.out_features // hd

    o_weight = attn_out.dense.weight.detach().clone()
    o_bias = bias_or_zeros(attn_out.dense).clone()
    v_dead = zero_rows(attn.value.weight).view(n_heads, hd).all(dim=1)
    o_dead = zero_cols(o_weight).view(n_heads, hd).all(dim=1)
    value_bias = bias_or_zeros(attn.value)
    for h in range(n_heads):
        cols = head_slices([h], hd)
        if v_dead[h] and not o_dead[h]:
            o_bias += o_weight[:, cols] @ value_bias[cols]
        if v_dead[h] or o_dead[h]:
            o_weight[:, cols] = 0  # a kept dead head (emptied layer) must contribute nothing more
    rows = head_slices(plan.heads_kept, hd)
    attn.query = sliced_linear(attn.query, rows=rows)
    attn.key = sliced_linear(attn.key, rows=rows)
    attn.value = sliced_linear(attn.value, rows=rows)
    attn_out.dense = sliced_linear(attn_out.dense, cols=rows, weight=o_weight, bias=o_bias)
    _set_head_count(attn, plan.shapes.heads, hd)

    d_weight = ffn_out.dense.weight.detach().clone()
    d_bias = bias_or_zeros(ffn_out.dense).clone()
    in_dead = zero_rows(inter.dense.weight)
    out_dead = zero_cols(d_weight)
    constants = inter.intermediate_act_fn(bias_or_zeros(inter.dense))
    for j in torch.nonzero(in_dead | out_dead).flatten().tolist():
        if in_dead[j] and not out_dead[j]:
            d_bias += constants[j] * d_weight[:, j]
        d_weight[:, j] = 0
    inter.dense = sliced_linear(inter.dense, rows=plan.neurons_kept)
    ffn_out.dense = sliced_linear(ffn_out.dense, cols=plan.neurons_kept, weight=d_weight, bias=d_bias)


def resize_layer(layer: nn.Module, shapes: LayerShapes, hd: int) -> None:
    """Allocate the compact shapes (weights come next from load_state_dict)."""
    attn = layer.attention.self
    hidden, dtype = attn.query.in_features, attn.query.weight.dtype
    width = shapes.heads * hd
    attn.query = empty_linear(hidden, width, True, dtype)
    attn.key = empty_linear(hidden, width, True, dtype)
    attn.value = empty_linear(hidden, width, True, dtype)
    layer.attention.output.dense = empty_linear(width, hidden, shapes.attn_out_bias, dtype)
    _set_head_count(attn, shapes.heads, hd)
    layer.intermediate.dense = empty_linear(hidden, shapes.ffn, True, dtype)
    layer.output.dense = empty_linear(shapes.ffn, hidden, shapes.ffn_out_bias, dtype)


def layer_params(layer: nn.Module) -> int:
    return linear_params(*_linears(layer))


def _set_head_count(attn: nn.Module, heads: int, hd: int) -> None:
    attn.num_attention_heads = heads
    attn.all_head_size = heads * hd


def _count(removed: dict[str, int], reason: str, count: int) -> None:
    if count:
        removed[reason] = removed.get(reason, 0) + count
        if removed[reason] == 0:
            del removed[reason]


def _first_reason(removed: dict[str, int], prefix: str) -> str:
    return next(reason for reason in removed if reason.startswith(prefix))
