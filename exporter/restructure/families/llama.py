"""Llama-style decoders (llama, mistral, qwen2): grouped-query attention groups and gated-MLP neurons.

Query head h reads KV head h // g (g = query heads per KV head, transformers' `repeat_kv`). The
attention code needs every layer's g to stay the same, so a KV group is removed whole, with all its
query heads:
- a group whose query heads all have zero o_proj columns contributes nothing;
- a group whose value rows are zero outputs its value bias (qwen2 has one) for every token: each of
  its query heads contributes W_o[:, head] @ b_v, folded into an o_proj bias (created if needed).
A dead query head inside a live group is kept (its o_proj columns are zero, so it adds exactly
nothing) and said in the plan's notes.
Gated MLP neuron j computes act(gate_j(x)) * up_j(x) -> down[:, j]. It is dead when its down column
is zero, its gate row is zero with act(gate bias) = 0, or its up row is zero with zero up bias; when
both gate and up rows are zero it is the constant act(b_gate) * b_up, folded into a down_proj bias.
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

MODEL_TYPES = ("llama", "mistral", "qwen2")


def base_model(model: nn.Module) -> nn.Module:
    return getattr(model, "model", model)


def layers(model: nn.Module) -> list[nn.Module]:
    return list(base_model(model).layers)


def head_dim(model: nn.Module) -> int:
    return int(layers(model)[0].self_attn.head_dim)


def _linears(layer: nn.Module) -> tuple[nn.Linear, ...]:
    attn, mlp = layer.self_attn, layer.mlp
    return (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj)


def layer_params(layer: nn.Module) -> int:
    return linear_params(*_linears(layer))


def _attention_state(layer: nn.Module, hd: int) -> tuple[int, int, torch.Tensor, torch.Tensor]:
    attn = layer.self_attn
    n_q, n_kv = attn.q_proj.out_features // hd, attn.k_proj.out_features // hd
    q_dead = zero_cols(attn.o_proj.weight).view(n_q, hd).all(dim=1)
    v_zero = zero_rows(attn.v_proj.weight).view(n_kv, hd).all(dim=1)
    return n_q, n_kv, q_dead, v_zero


def _mlp_state(mlp: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dead, constant, constant values): constant neurons are dead too, with a value to fold."""
    gate_zero, up_zero = zero_rows(mlp.gate_proj.weight), zero_rows(mlp.up_proj.weight)
    gate_const = mlp.act_fn(bias_or_zeros(mlp.gate_proj))
    up_const = bias_or_zeros(mlp.up_proj)
    values = gate_const * up_const
    constant = gate_zero & up_zero
    dead = zero_cols(mlp.down_proj.weight) | (gate_zero & (gate_const == 0)) | (up_zero & (up_const == 0))
    return dead | constant, constant & ~dead, values


def plan_layer(layer: nn.Module, index: int, hd: int) -> LayerPlan:
    n_q, n_kv, q_dead, v_zero = _attention_state(layer, hd)
    g = n_q // n_kv
    removed: dict[str, int] = {}
    notes: list[str] = []
    kv_kept: list[int] = []
    group_reason: dict[int, str] = {}
    for j in range(n_kv):
        group = q_dead[j * g : (j + 1) * g]
        if group.all():
            group_reason[j] = "kv groups: all query heads have zero o_proj columns"
        elif v_zero[j]:
            group_reason[j] = "kv groups: zero value rows (value bias folded)"
        else:
            kv_kept.append(j)
            dead_inside = [j * g + i for i in range(g) if group[i]]
            if dead_inside:
                notes.append(
                    f"query heads {dead_inside} are dead (zero o_proj columns) but KV group {j} is live: "
                    "kept, since every group must keep its query heads"
                )
    if not kv_kept:
        kv_kept = [0]
        del group_reason[0]
        notes.append(
            "all KV groups dead: group 0 kept as a zero unit (o_proj columns zeroed, constants folded)"
        )
    for reason in group_reason.values():
        removed[reason] = removed.get(reason, 0) + 1
    heads_kept = [j * g + i for j in kv_kept for i in range(g)]

    mlp = layer.mlp
    dead, constant, _ = _mlp_state(mlp)
    neurons_kept = [j for j in range(mlp.gate_proj.out_features) if not dead[j]]
    removed_dead, removed_constant = dead & ~constant, constant.clone()
    if not neurons_kept:
        neurons_kept = [0]
        removed_dead[0] = removed_constant[0] = False
        notes.append("all FFN neurons dead: neuron 0 kept as a zero unit (down_proj column zeroed)")
    if int(removed_dead.sum()):
        removed["ffn neurons: zero (no contribution)"] = int(removed_dead.sum())
    if int(removed_constant.sum()):
        removed["ffn neurons: constant act(b_gate)*b_up (folded)"] = int(removed_constant.sum())

    attn_fold = _attention_fold(layer, hd)
    mlp_fold = _mlp_fold(mlp)
    shapes = LayerShapes(
        heads=len(heads_kept),
        kv_heads=len(kv_kept),
        ffn=len(neurons_kept),
        attn_out_bias=layer.self_attn.o_proj.bias is not None or bool(attn_fold.any()),
        ffn_out_bias=mlp.down_proj.bias is not None or bool(mlp_fold.any()),
    )
    return LayerPlan(index, heads_kept, kv_kept, neurons_kept, removed, notes, shapes, layer_params(layer))


def _attention_fold(layer: nn.Module, hd: int) -> torch.Tensor:
    """The constant that removed value-dead groups add to o_proj's output."""
    attn = layer.self_attn
    n_q, n_kv, q_dead, v_zero = _attention_state(layer, hd)
    g = n_q // n_kv
    fold = torch.zeros(attn.o_proj.out_features, dtype=attn.o_proj.weight.dtype)
    v_bias = bias_or_zeros(attn.v_proj)
    for j in torch.nonzero(v_zero).flatten().tolist():
        for h in range(j * g, (j + 1) * g):
            if not q_dead[h]:
                fold += attn.o_proj.weight.detach()[:, head_slices([h], hd)] @ v_bias[head_slices([j], hd)]
    return fold


def _mlp_fold(mlp: nn.Module) -> torch.Tensor:
    _, constant, values = _mlp_state(mlp)
    weight = mlp.down_proj.weight.detach()
    return weight[:, constant] @ values[constant] if constant.any() else torch.zeros(weight.shape[0])


def apply_layer(layer: nn.Module, plan: LayerPlan, hd: int) -> None:
    """Fold the constants of dead units into the next biases, then slice to the kept units."""
    attn, mlp = layer.self_attn, layer.mlp
    n_q, _, q_dead, v_zero = _attention_state(layer, hd)
    o_bias = bias_or_zeros(attn.o_proj) + _attention_fold(layer, hd) if plan.shapes.attn_out_bias else None
    o_weight = attn.o_proj.weight.detach().clone()
    n_kv = attn.k_proj.out_features // hd
    g = n_q // n_kv
    for j in plan.kv_heads_kept or []:  # a kept dead group (emptied layer) must contribute nothing more
        if v_zero[j] or q_dead[j * g : (j + 1) * g].all():
            o_weight[:, head_slices(list(range(j * g, (j + 1) * g)), hd)] = 0
    q_rows = head_slices(plan.heads_kept, hd)
    kv_rows = head_slices(plan.kv_heads_kept or [], hd)
    attn.q_proj = sliced_linear(attn.q_proj, rows=q_rows)
    attn.k_proj = sliced_linear(attn.k_proj, rows=kv_rows)
    attn.v_proj = sliced_linear(attn.v_proj, rows=kv_rows)
    attn.o_proj = sliced_linear(attn.o_proj, cols=q_rows, weight=o_weight, bias=o_bias)

    dead, _, _ = _mlp_state(mlp)
    d_bias = bias_or_zeros(mlp.down_proj) + _mlp_fold(mlp) if plan.shapes.ffn_out_bias else None
    d_weight = mlp.down_proj.weight.detach().clone()
    d_weight[:, dead] = 0
    keep = plan.neurons_kept
    mlp.gate_proj = sliced_linear(mlp.gate_proj, rows=keep)
    mlp.up_proj = sliced_linear(mlp.up_proj, rows=keep)
    mlp.down_proj = sliced_linear(mlp.down_proj, cols=keep, weight=d_weight, bias=d_bias)


def resize_layer(layer: nn.Module, shapes: LayerShapes, hd: int) -> None:
    """Allocate the compact shapes (weights come next from load_state_dict)."""
    attn, mlp = layer.self_attn, layer.mlp
    hidden, dtype = attn.q_proj.in_features, attn.q_proj.weight.dtype
    qkv_bias = attn.q_proj.bias is not None
    kv_heads = shapes.kv_heads or shapes.heads
    attn.q_proj = empty_linear(hidden, shapes.heads * hd, qkv_bias, dtype)
    attn.k_proj = empty_linear(hidden, kv_heads * hd, attn.k_proj.bias is not None, dtype)
    attn.v_proj = empty_linear(hidden, kv_heads * hd, attn.v_proj.bias is not None, dtype)
    attn.o_proj = empty_linear(shapes.heads * hd, hidden, shapes.attn_out_bias, dtype)
    mlp_bias = mlp.gate_proj.bias is not None
    mlp.gate_proj = empty_linear(hidden, shapes.ffn, mlp_bias, dtype)
    mlp.up_proj = empty_linear(hidden, shapes.ffn, mlp.up_proj.bias is not None, dtype)
    mlp.down_proj = empty_linear(shapes.ffn, hidden, shapes.ffn_out_bias, dtype)
