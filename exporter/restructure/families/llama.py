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

Whole sublayers: when every KV group of a layer is dead its attention is removed (no projections, no
attention, no KV cache: `sublayers.CompactDecoderLayer`), and the constant it output (o_proj bias +
folded value biases), if any, is added to the residual; likewise an MLP with every neuron dead (down_proj
bias + folded constant neurons). The layers that keep an attention write consecutive cache slots
(`renumber_cache_slots`), so the cache holds one entry per attention, none for removed ones.
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
from exporter.restructure.families.sublayers import CompactDecoderLayer
from exporter.restructure.plan import LayerPlan, LayerShapes

MODEL_TYPES = ("llama", "mistral", "qwen2")


def base_model(model: nn.Module) -> nn.Module:
    return getattr(model, "model", model)


def layers(model: nn.Module) -> list[nn.Module]:
    return list(base_model(model).layers)


def set_layer(model: nn.Module, index: int, layer: nn.Module) -> None:
    base_model(model).layers[index] = layer


def head_dim(model: nn.Module) -> int:
    attention = next((layer.self_attn for layer in layers(model) if has_attention(layer)), None)
    if attention is not None:
        return int(attention.head_dim)
    config = model.config
    return int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)


def has_attention(layer: nn.Module) -> bool:
    """False for a layer whose attention a restructure removed."""
    return getattr(layer, "self_attn", None) is not None


def has_mlp(layer: nn.Module) -> bool:
    return getattr(layer, "mlp", None) is not None


def renumber_cache_slots(model: nn.Module) -> list[int]:
    """The layers that keep an attention, in order; each one's attention writes cache slot = its rank
    (transformers' caches are indexed by `self_attn.layer_idx`). Unpruned models: slot = layer index."""
    cache_layers = []
    for index, layer in enumerate(layers(model)):
        if has_attention(layer):
            layer.self_attn.layer_idx = len(cache_layers)
            cache_layers.append(index)
    return cache_layers


def finish_model(model: nn.Module) -> None:
    """Model-level bookkeeping after layers changed: cache slots follow the attentions left."""
    renumber_cache_slots(model)


def _linears(layer: nn.Module) -> list[nn.Linear]:
    found = []
    if has_attention(layer):
        attn = layer.self_attn
        found += [attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj]
    if has_mlp(layer):
        found += [layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj]
    return found


def layer_params(layer: nn.Module) -> int:
    constants = (getattr(layer, name, None) for name in ("attn_residual_bias", "mlp_residual_bias"))
    return linear_params(*_linears(layer)) + sum(c.numel() for c in constants if c is not None)


def _hidden(layer: nn.Module) -> int:
    if has_attention(layer):
        return int(layer.self_attn.q_proj.in_features)
    return int(layer.mlp.gate_proj.in_features) if has_mlp(layer) else 0


def _attention_state(attn: nn.Module, hd: int) -> tuple[int, int, torch.Tensor, torch.Tensor]:
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


# ------------------------------------------------------------------------------------------- planning


def plan_layer(layer: nn.Module, index: int, hd: int) -> LayerPlan:
    removed: dict[str, int] = {}
    notes: list[str] = []
    heads_kept, kv_kept, attn_bias = _plan_attention(layer, hd, removed, notes)
    neurons_kept, mlp_bias = _plan_mlp(layer, removed, notes)
    shapes = LayerShapes(
        heads=len(heads_kept),
        kv_heads=len(kv_kept),
        ffn=len(neurons_kept),
        attn_out_bias=attn_bias,
        ffn_out_bias=mlp_bias,
    )
    plan = LayerPlan(index, heads_kept, kv_kept, neurons_kept, removed, notes, shapes, layer_params(layer))
    _plan_flops(plan, layer, hd)
    return plan


def _plan_attention(
    layer: nn.Module, hd: int, removed: dict[str, int], notes: list[str]
) -> tuple[list[int], list[int], bool]:
    """(query heads kept, KV groups kept, whether o_proj has or gains a bias; with no group kept:
    whether the removed attention leaves a constant for the residual)."""
    if not has_attention(layer):  # removed by an earlier restructure
        return [], [], layer.attn_residual_bias is not None
    attn = layer.self_attn
    n_q, n_kv, q_dead, v_zero = _attention_state(attn, hd)
    g = n_q // n_kv
    kv_kept: list[int] = []
    for j in range(n_kv):
        group = q_dead[j * g : (j + 1) * g]
        if group.all():
            reason = "kv groups: all query heads have zero o_proj columns"
        elif v_zero[j]:
            reason = "kv groups: zero value rows (value bias folded)"
        else:
            kv_kept.append(j)
            dead_inside = [j * g + i for i in range(g) if group[i]]
            if dead_inside:
                notes.append(
                    f"query heads {dead_inside} are dead (zero o_proj columns) but KV group {j} is live: "
                    "kept, since every group must keep its query heads"
                )
            continue
        removed[reason] = removed.get(reason, 0) + 1
    bias = attn.o_proj.bias is not None or bool(_attention_fold(attn, hd).any())
    if not kv_kept:
        constant = "its constant output (o_proj bias + folded value biases) is added to the residual"
        notes.append(
            "attention removed (every KV group dead): no projections, no attention, no KV cache; "
            + (constant if bias else "it added nothing")
        )
    return [j * g + i for j in kv_kept for i in range(g)], kv_kept, bias


def _plan_mlp(layer: nn.Module, removed: dict[str, int], notes: list[str]) -> tuple[list[int], bool]:
    """(neurons kept, whether down_proj has or gains a bias; with no neuron kept: whether the removed
    MLP leaves a constant for the residual)."""
    if not has_mlp(layer):  # removed by an earlier restructure
        return [], layer.mlp_residual_bias is not None
    mlp = layer.mlp
    dead, constant, _ = _mlp_state(mlp)
    neurons_kept = [j for j in range(mlp.gate_proj.out_features) if not dead[j]]
    if int((dead & ~constant).sum()):
        removed["ffn neurons: zero (no contribution)"] = int((dead & ~constant).sum())
    if int(constant.sum()):
        removed["ffn neurons: constant act(b_gate)*b_up (folded)"] = int(constant.sum())
    bias = mlp.down_proj.bias is not None or bool(_mlp_fold(mlp).any())
    if not neurons_kept:
        folded = "its constant output (down_proj bias + folded act(b_gate)*b_up) is added to the residual"
        notes.append(
            "MLP removed (every neuron dead): no projections; " + (folded if bias else "it added nothing")
        )
    return neurons_kept, bias


def _plan_flops(plan: LayerPlan, layer: nn.Module, hd: int) -> None:
    """FLOPs per token before / after (exporter/restructure/flops.py), and what the removed sublayers cost."""
    hidden = _hidden(layer)
    n_q, n_kv = 0, 0
    if has_attention(layer):
        n_q, n_kv = layer.self_attn.q_proj.out_features // hd, layer.self_attn.k_proj.out_features // hd
    attention = flops.attention_flops(hidden, n_q, n_kv, hd)
    mlp = flops.mlp_flops(hidden, layer.mlp.gate_proj.out_features if has_mlp(layer) else 0, gated=True)
    shapes = plan.shapes
    plan.flops_before = flops.add(attention, mlp)
    plan.flops_after = flops.add(
        flops.attention_flops(hidden, shapes.heads, shapes.kv_heads or 0, hd),
        flops.mlp_flops(hidden, shapes.ffn, gated=True),
    )
    gone = [count for count, kept in ((attention, shapes.has_attention), (mlp, shapes.has_mlp)) if not kept]
    plan.flops_saved_by_sublayer_removal = flops.add(*gone) if gone else flops.flops()


def _attention_fold(attn: nn.Module, hd: int) -> torch.Tensor:
    """The constant that removed value-dead groups add to o_proj's output."""
    n_q, n_kv, q_dead, v_zero = _attention_state(attn, hd)
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


# ------------------------------------------------------------------------------------------- applying


def apply_layer(layer: nn.Module, plan: LayerPlan, hd: int) -> nn.Module:
    """Fold the constants of dead units into the next biases, then slice to the kept units; a sublayer
    with no unit left goes, its constant kept for the residual. Returns the layer to use: the same HF
    layer, or a `CompactDecoderLayer` when a whole sublayer is gone."""
    shapes = plan.shapes
    attn_constant = (
        _attention_constant(layer, hd) if not shapes.has_attention and shapes.attn_out_bias else None
    )
    mlp_constant = _mlp_constant(layer) if not shapes.has_mlp and shapes.ffn_out_bias else None
    if shapes.has_attention:
        _slice_attention(layer.self_attn, plan, hd)
    if shapes.has_mlp:
        _slice_mlp(layer.mlp, plan)
    if shapes.has_attention and shapes.has_mlp and not isinstance(layer, CompactDecoderLayer):
        return layer
    return CompactDecoderLayer(
        layer,
        attention=shapes.has_attention,
        mlp=shapes.has_mlp,
        attn_constant=attn_constant,
        mlp_constant=mlp_constant,
    )


def _attention_constant(layer: nn.Module, hd: int) -> torch.Tensor:
    """What an attention with every group dead adds to the residual: o_proj bias + folded value biases."""
    if not has_attention(layer):
        return layer.attn_residual_bias.detach()
    return bias_or_zeros(layer.self_attn.o_proj) + _attention_fold(layer.self_attn, hd)


def _mlp_constant(layer: nn.Module) -> torch.Tensor:
    """What an MLP with every neuron dead adds to the residual: down_proj bias + folded constant neurons."""
    if not has_mlp(layer):
        return layer.mlp_residual_bias.detach()
    return bias_or_zeros(layer.mlp.down_proj) + _mlp_fold(layer.mlp)


def _slice_attention(attn: nn.Module, plan: LayerPlan, hd: int) -> None:
    o_bias = bias_or_zeros(attn.o_proj) + _attention_fold(attn, hd) if plan.shapes.attn_out_bias else None
    q_rows = head_slices(plan.heads_kept, hd)
    kv_rows = head_slices(plan.kv_heads_kept or [], hd)
    attn.q_proj = sliced_linear(attn.q_proj, rows=q_rows)
    attn.k_proj = sliced_linear(attn.k_proj, rows=kv_rows)
    attn.v_proj = sliced_linear(attn.v_proj, rows=kv_rows)
    attn.o_proj = sliced_linear(attn.o_proj, cols=q_rows, bias=o_bias)


def _slice_mlp(mlp: nn.Module, plan: LayerPlan) -> None:
    d_bias = bias_or_zeros(mlp.down_proj) + _mlp_fold(mlp) if plan.shapes.ffn_out_bias else None
    keep = plan.neurons_kept
    mlp.gate_proj = sliced_linear(mlp.gate_proj, rows=keep)
    mlp.up_proj = sliced_linear(mlp.up_proj, rows=keep)
    mlp.down_proj = sliced_linear(mlp.down_proj, cols=keep, bias=d_bias)


def resize_layer(layer: nn.Module, shapes: LayerShapes, hd: int) -> nn.Module:
    """Allocate the compact shapes (weights come next from load_state_dict); returns the layer to use."""
    attn, mlp = layer.self_attn, layer.mlp
    hidden, dtype = attn.q_proj.in_features, attn.q_proj.weight.dtype
    if shapes.has_attention:
        kv_heads = shapes.kv_heads or shapes.heads
        attn.q_proj = empty_linear(hidden, shapes.heads * hd, attn.q_proj.bias is not None, dtype)
        attn.k_proj = empty_linear(hidden, kv_heads * hd, attn.k_proj.bias is not None, dtype)
        attn.v_proj = empty_linear(hidden, kv_heads * hd, attn.v_proj.bias is not None, dtype)
        attn.o_proj = empty_linear(shapes.heads * hd, hidden, shapes.attn_out_bias, dtype)
    if shapes.has_mlp:
        mlp.gate_proj = empty_linear(hidden, shapes.ffn, mlp.gate_proj.bias is not None, dtype)
        mlp.up_proj = empty_linear(hidden, shapes.ffn, mlp.up_proj.bias is not None, dtype)
        mlp.down_proj = empty_linear(shapes.ffn, hidden, shapes.ffn_out_bias, dtype)
    if shapes.has_attention and shapes.has_mlp:
        return layer
    zeros = torch.zeros(hidden, dtype=dtype)
    return CompactDecoderLayer(
        layer,
        attention=shapes.has_attention,
        mlp=shapes.has_mlp,
        attn_constant=zeros if shapes.attn_out_bias else None,
        mlp_constant=zeros if shapes.ffn_out_bias else None,
    )
