"""BERT-style encoders (bert, roberta): heads and FFN neurons of each layer.

Dead structure, found in the effective (merged, masked) weights:
- a head whose columns of the attention output projection are all zero contributes nothing;
- a head whose value rows are all zero outputs its value bias b_v for every token (softmax rows sum
  to 1), so it contributes the constant W_o[:, head] @ b_v: folded into the output bias, then removed;
- an FFN neuron whose output column is zero contributes nothing;
- an FFN neuron whose input row is zero outputs act(b_1) for every token: act(b_1) * W_2[:, j] is
  folded into the output bias, then removed.
Whole sublayers: a layer whose heads all die loses its attention, and one whose neurons all die its
FFN. Post-norm BERT computes LayerNorm(h + sublayer(h)), and a dead sublayer outputs its constant c
(output bias + folded constants), so only what the LayerNorm needs stays: LayerNorm(h + c)
(`sublayers.RemovedBertAttention`, `sublayers.ConstantResidualNorm`).
"""

from __future__ import annotations

import torch
from torch import nn

from exporter.restructure import flops
from exporter.restructure.families._linear import (
    bias_or_zeros,
    empty_linear,
    head_slices,
    linear_params,
    sliced_linear,
    zero_cols,
    zero_rows,
)
from exporter.restructure.families.sublayers import ConstantResidualNorm, RemovedBertAttention
from exporter.restructure.plan import LayerPlan, LayerShapes

MODEL_TYPES = ("bert", "roberta")


def base_model(model: nn.Module) -> nn.Module:
    return getattr(model, getattr(model, "base_model_prefix", ""), model)


def layers(model: nn.Module) -> list[nn.Module]:
    return list(base_model(model).encoder.layer)


def set_layer(model: nn.Module, index: int, layer: nn.Module) -> None:
    base_model(model).encoder.layer[index] = layer


def head_dim(model: nn.Module) -> int:
    config = model.config
    return int(config.hidden_size // config.num_attention_heads)


def finish_model(model: nn.Module) -> None:
    """Nothing model-level changes for encoders."""


def has_attention(layer: nn.Module) -> bool:
    return not isinstance(layer.attention, RemovedBertAttention)


def has_ffn(layer: nn.Module) -> bool:
    return not isinstance(layer.output, ConstantResidualNorm)


def _linears(layer: nn.Module) -> list[nn.Linear]:
    found = []
    if has_attention(layer):
        attn = layer.attention.self
        found += [attn.query, attn.key, attn.value, layer.attention.output.dense]
    if has_ffn(layer):
        found += [layer.intermediate.dense, layer.output.dense]
    return found


def layer_params(layer: nn.Module) -> int:
    norms = [layer.attention.output, layer.output]
    constants = [
        n.residual_bias for n in norms if isinstance(n, ConstantResidualNorm) and n.residual_bias is not None
    ]
    return linear_params(*_linears(layer)) + sum(c.numel() for c in constants)


def _head_state(layer: nn.Module, hd: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(output-projection-dead, value-dead) per head."""
    attn, out_proj = layer.attention.self, layer.attention.output.dense
    n_heads = attn.query.out_features // hd
    o_dead = zero_cols(out_proj.weight).view(n_heads, hd).all(dim=1)
    v_dead = zero_rows(attn.value.weight).view(n_heads, hd).all(dim=1)
    return o_dead, v_dead


def _neuron_state(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(output-column-dead, input-row-dead) per FFN neuron."""
    return zero_cols(layer.output.dense.weight), zero_rows(layer.intermediate.dense.weight)


# ------------------------------------------------------------------------------------------- planning


def plan_layer(layer: nn.Module, index: int, hd: int) -> LayerPlan:
    removed: dict[str, int] = {}
    notes: list[str] = []
    heads_kept, attn_bias = _plan_attention(layer, hd, removed, notes)
    neurons_kept, ffn_bias = _plan_ffn(layer, removed, notes)
    shapes = LayerShapes(
        heads=len(heads_kept),
        kv_heads=None,
        ffn=len(neurons_kept),
        attn_out_bias=attn_bias,
        ffn_out_bias=ffn_bias,
    )
    plan = LayerPlan(index, heads_kept, None, neurons_kept, removed, notes, shapes, layer_params(layer))
    _plan_flops(plan, layer, hd)
    return plan


def _plan_attention(
    layer: nn.Module, hd: int, removed: dict[str, int], notes: list[str]
) -> tuple[list[int], bool]:
    if not has_attention(layer):  # removed by an earlier restructure
        return [], layer.attention.output.residual_bias is not None
    o_dead, v_dead = _head_state(layer, hd)
    heads_kept = [h for h in range(len(o_dead)) if not (o_dead[h] or v_dead[h])]
    _count(removed, "heads: zero output-projection columns", int(o_dead.sum()))
    _count(removed, "heads: zero value rows (value bias folded)", int((v_dead & ~o_dead).sum()))
    bias = layer.attention.output.dense.bias is not None or bool((v_dead & ~o_dead).any())
    if not heads_kept:
        notes.append(
            "attention removed (every head dead): no projections, no attention; LayerNorm(h + c) is kept, "
            "c = the output bias + folded value biases"
        )
    return heads_kept, bias


def _plan_ffn(layer: nn.Module, removed: dict[str, int], notes: list[str]) -> tuple[list[int], bool]:
    if not has_ffn(layer):  # removed by an earlier restructure
        return [], layer.output.residual_bias is not None
    out_dead, in_dead = _neuron_state(layer)
    neurons_kept = [j for j in range(len(out_dead)) if not (out_dead[j] or in_dead[j])]
    _count(removed, "ffn neurons: zero output column", int(out_dead.sum()))
    _count(removed, "ffn neurons: zero input row (act(bias) folded)", int((in_dead & ~out_dead).sum()))
    bias = layer.output.dense.bias is not None or bool((in_dead & ~out_dead).any())
    if not neurons_kept:
        notes.append(
            "FFN removed (every neuron dead): no projections; LayerNorm(h + c) is kept, "
            "c = the output bias + folded act(b1) constants"
        )
    return neurons_kept, bias


def _plan_flops(plan: LayerPlan, layer: nn.Module, hd: int) -> None:
    """FLOPs per token before / after (exporter/restructure/flops.py), and what the removed sublayers cost."""
    hidden = int(layer.attention.output.LayerNorm.normalized_shape[0])
    heads = layer.attention.self.query.out_features // hd if has_attention(layer) else 0
    ffn = layer.intermediate.dense.out_features if has_ffn(layer) else 0
    attention = flops.attention_flops(hidden, heads, heads, hd)
    mlp = flops.mlp_flops(hidden, ffn, gated=False)
    shapes = plan.shapes
    plan.flops_before = flops.add(attention, mlp)
    plan.flops_after = flops.add(
        flops.attention_flops(hidden, shapes.heads, shapes.heads, hd),
        flops.mlp_flops(hidden, shapes.ffn, gated=False),
    )
    gone = [count for count, kept in ((attention, shapes.has_attention), (mlp, shapes.has_mlp)) if not kept]
    plan.flops_saved_by_sublayer_removal = flops.add(*gone) if gone else flops.flops()


# ------------------------------------------------------------------------------------------- applying


def apply_layer(layer: nn.Module, plan: LayerPlan, hd: int) -> nn.Module:
    """Fold the constants of dead units into the next biases, then slice to the kept units; a sublayer
    with no unit left becomes LayerNorm(h + c). Returns the (same) layer."""
    if has_attention(layer):
        _apply_attention(layer, plan, hd)
    if has_ffn(layer):
        _apply_ffn(layer, plan)
    return layer


def _apply_attention(layer: nn.Module, plan: LayerPlan, hd: int) -> None:
    attn, attn_out = layer.attention.self, layer.attention.output
    o_weight = attn_out.dense.weight.detach().clone()
    o_bias = bias_or_zeros(attn_out.dense).clone()
    o_dead, v_dead = _head_state(layer, hd)
    value_bias = bias_or_zeros(attn.value)
    for h in torch.nonzero(v_dead & ~o_dead).flatten().tolist():
        cols = head_slices([h], hd)
        o_bias += o_weight[:, cols] @ value_bias[cols]
    if not plan.shapes.has_attention:
        layer.attention = RemovedBertAttention(
            attn_out.LayerNorm, o_bias if plan.shapes.attn_out_bias else None
        )
        return
    rows = head_slices(plan.heads_kept, hd)
    attn.query = sliced_linear(attn.query, rows=rows)
    attn.key = sliced_linear(attn.key, rows=rows)
    attn.value = sliced_linear(attn.value, rows=rows)
    bias = o_bias if plan.shapes.attn_out_bias else None
    attn_out.dense = sliced_linear(attn_out.dense, cols=rows, weight=o_weight, bias=bias)
    _set_head_count(attn, plan.shapes.heads, hd)


def _apply_ffn(layer: nn.Module, plan: LayerPlan) -> None:
    inter, ffn_out = layer.intermediate, layer.output
    d_weight = ffn_out.dense.weight.detach()
    d_bias = bias_or_zeros(ffn_out.dense).clone()
    out_dead, in_dead = _neuron_state(layer)
    constants = inter.intermediate_act_fn(bias_or_zeros(inter.dense))
    for j in torch.nonzero(in_dead & ~out_dead).flatten().tolist():
        d_bias += constants[j] * d_weight[:, j]
    bias = d_bias if plan.shapes.ffn_out_bias else None
    if not plan.shapes.has_mlp:
        layer.intermediate = nn.Identity()
        layer.output = ConstantResidualNorm(ffn_out.LayerNorm, bias)
        return
    inter.dense = sliced_linear(inter.dense, rows=plan.neurons_kept)
    ffn_out.dense = sliced_linear(ffn_out.dense, cols=plan.neurons_kept, bias=bias)


def resize_layer(layer: nn.Module, shapes: LayerShapes, hd: int) -> nn.Module:
    """Allocate the compact shapes (weights come next from load_state_dict); returns the (same) layer."""
    attn = layer.attention.self
    hidden, dtype = attn.query.in_features, attn.query.weight.dtype
    zeros = torch.zeros(hidden, dtype=dtype)
    if shapes.has_attention:
        width = shapes.heads * hd
        attn.query = empty_linear(hidden, width, True, dtype)
        attn.key = empty_linear(hidden, width, True, dtype)
        attn.value = empty_linear(hidden, width, True, dtype)
        layer.attention.output.dense = empty_linear(width, hidden, shapes.attn_out_bias, dtype)
        _set_head_count(attn, shapes.heads, hd)
    else:
        norm = layer.attention.output.LayerNorm
        layer.attention = RemovedBertAttention(norm, zeros if shapes.attn_out_bias else None)
    if shapes.has_mlp:
        layer.intermediate.dense = empty_linear(hidden, shapes.ffn, True, dtype)
        layer.output.dense = empty_linear(shapes.ffn, hidden, shapes.ffn_out_bias, dtype)
    else:
        layer.intermediate = nn.Identity()
        layer.output = ConstantResidualNorm(layer.output.LayerNorm, zeros if shapes.ffn_out_bias else None)
    return layer


def _set_head_count(attn: nn.Module, heads: int, hd: int) -> None:
    attn.num_attention_heads = heads
    attn.all_head_size = heads * hd


def _count(removed: dict[str, int], reason: str, count: int) -> None:
    if count:
        removed[reason] = removed.get(reason, 0) + count
