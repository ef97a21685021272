"""Decoder self-attention fusion (onnxruntime target): -> com.microsoft GroupQueryAttention with rotary.

Identity (Llama / Qwen2 eager attention, per layer, no KV cache):
    q, k, v = projections reshaped to [B, n_q | n_kv, S, h]
    q, k    = q·cos + rotate_half(q)·sin,  k·cos + rotate_half(k)·sin      (rotate_half = [-x2, x1])
    k, v    = repeat_kv(k, v, n_q / n_kv)                                   (Unsqueeze/Expand/Reshape)
    out     = reshape(softmax(scale · q·kᵀ + mask) · v, [B, S, n_q·h])
which is `GroupQueryAttention(q, k, v, seqlens_k=S-1, total_sequence_length=S, cos_cache, sin_cache,
attention_bias=mask, num_heads=n_q, kv_num_heads=n_kv, do_rotary=1, scale)`: no repeated K/V in memory,
rotary applied inside the kernel.

Per-layer heads: h from the layer's Reshape target, n_q / n_kv from the q / k projection widths.
cos/sin caches are the graph's own cos/sin ([1, S, h], computed from positions 0..S-1 by the exporter's
rotary module) sliced to their first h/2 columns; the check verifies they are built as cos(concat(f, f))
so the two halves agree. The mask (causal + padding, additive) is passed as attention_bias, so padded
keys stay masked. On fully padded query rows (left padding) HF's eager softmax averages over every key
while GQA also applies its causal mask: those rows' outputs differ, and they are padding.
Not matched: per-batch position ids (the report says why), and graphs with a KV cache (K/V
concatenated with past_key_values), which graph_passes/fuse_gqa_kv_cache.py fuses (rotary as a separate
RotaryEmbedding fed per-token rows, exact for any positions).
"""

from __future__ import annotations

from collections.abc import Sequence

import onnx_ir as ir
from onnxscript.rewriter import pattern

from graph_passes._rules import (
    RewriteRulesPass,
    attention_bias_problem,
    constant_array,
    head_size_from_reshape,
    scalar_value,
)


def rotary_pattern(op, t, cos_u, sin_u, tag: str):  # type: ignore[no-untyped-def]
    """t·cos + rotate_half(t)·sin as the exporter writes it (its slice bounds named `{tag}_*`)."""
    var = {name: pattern.Var(f"{tag}_{name}") for name in ("zero", "half1", "axes1", "steps1")}
    var |= {name: pattern.Var(f"{tag}_{name}") for name in ("half2", "end", "axes2", "steps2")}
    first = op.Slice(t, var["zero"], var["half1"], var["axes1"], var["steps1"])
    second = op.Slice(t, var["half2"], var["end"], var["axes2"], var["steps2"])
    rotated = op.Concat(op.Neg(second), first, axis=-1)
    return op.Add(op.Mul(t, cos_u), op.Mul(rotated, sin_u))


def rotated_qkv_pattern(op, q_lin, k_lin, v_lin, shapes, cos, sin, cos_axes, sin_axes):  # type: ignore[no-untyped-def]
    """HF Llama attention's head split ([B, S, n·h] -> [B, n, S, h]) and rotary of q and k, as exported:
    (q, k, v) in [B, n, S, h]. `shapes`: the three Reshape targets."""
    cos_u, sin_u = op.Unsqueeze(cos, cos_axes), op.Unsqueeze(sin, sin_axes)
    q, k, v = (
        op.Transpose(op.Reshape(x, shape, _allow_other_attributes=True), perm=[0, 2, 1, 3])
        for x, shape in zip((q_lin, k_lin, v_lin), shapes)
    )
    return rotary_pattern(op, q, cos_u, sin_u, "q"), rotary_pattern(op, k, cos_u, sin_u, "k"), v


def repeat_kv_pattern(op, t, repeat: bool, tag: str):  # type: ignore[no-untyped-def]
    if not repeat:
        return t
    expanded = op.Expand(op.Unsqueeze(t, pattern.Var(f"{tag}_axes")), pattern.Var(f"{tag}_shape"))
    return op.Reshape(expanded, pattern.Var(f"{tag}_target"), _allow_other_attributes=True)


def is_half_of_last_dim(value: ir.Value, head: int) -> bool:
    """`value` is head/2, as a constant or as the exporter computes it: Unsqueeze(Div(Shape(t)[-1], 2))."""
    array = constant_array(value)
    if array is not None:
        return array.reshape(-1).tolist() == [head // 2]
    node = value.producer()
    if node is not None and node.op_type == "Unsqueeze":
        node = node.inputs[0].producer()
    if node is None or node.op_type != "Div" or scalar_value(node.inputs[1]) != 2:
        return False
    gather = node.inputs[0].producer()
    if gather is None or gather.op_type != "Gather" or scalar_value(gather.inputs[1]) not in (3, -1):
        return False
    shape = gather.inputs[0].producer()
    return shape is not None and shape.op_type == "Shape"


def duplicated_halves(table: ir.Value) -> bool:
    """True if `table` is [scale ·] Cos/Sin(Concat(f, f)) — the half-duplicated rotary table."""
    node = table.producer()
    if node is not None and node.op_type == "Mul":
        node = next((i.producer() for i in node.inputs if i is not None and i.producer() is not None), None)
    if node is None or node.op_type not in ("Cos", "Sin"):
        return False
    concat = node.inputs[0].producer()
    return (
        concat is not None
        and concat.op_type == "Concat"
        and len(concat.inputs) == 2
        and (concat.inputs[0] is concat.inputs[1])
    )


def rotary_problem(cos: ir.Value, sin: ir.Value, head: int, vs: dict) -> str | None:
    """Why the matched rotary (`rotary_pattern` for tags "q" and "k", tables `cos` / `sin` of rank 3) is
    not HF's non-interleaved rotate_half rotary over the whole head, or None if it is."""
    for table in (cos, sin):
        if table.shape is None or table.shape.rank() != 3 or table.shape[2] != head:
            return f"rotary table is not [batch or 1, S, {head}]"
        if not duplicated_halves(table):
            return "rotary table is not built as cos/sin(concat(f, f))"
    for tag in ("q", "k"):
        const = {
            name: constant_array(vs[f"{tag}_{name}"])
            for name in ("zero", "axes1", "axes2", "steps1", "steps2")
        }
        if any(a is None for a in const.values()) or const["zero"].reshape(-1).tolist() != [0]:
            return "rotate_half slices do not start at 0"
        for name in ("axes1", "axes2"):
            if const[name].reshape(-1).tolist() not in ([3], [-1]):
                return "rotate_half slices are not over the last axis"
        if const["steps1"].reshape(-1).tolist() != [1] or const["steps2"].reshape(-1).tolist() != [1]:
            return "rotate_half slices do not have step 1"
        if not (
            is_half_of_last_dim(vs[f"{tag}_half1"], head) and is_half_of_last_dim(vs[f"{tag}_half2"], head)
        ):
            return "rotate_half does not split the head at head_size / 2"
    return None


def layer_heads(
    q_lin: ir.Value, k_lin: ir.Value, v_lin: ir.Value, reshapes: Sequence[ir.Value]
) -> tuple[int, int, int] | str:
    """(n_q, n_kv, head size) from the projection widths and the Reshape targets, or why not."""
    head_sizes = {head_size_from_reshape(s) for s in reshapes}
    if len(head_sizes) != 1 or None in head_sizes:
        return "head size is not the same static value in the Q/K/V reshapes"
    head = head_sizes.pop()
    assert head is not None
    widths = [v.shape[-1] if v.shape is not None else None for v in (q_lin, k_lin, v_lin)]
    if not all(isinstance(w, int) and w % head == 0 for w in widths) or widths[1] != widths[2]:
        return f"Q/K/V widths {widths} are unknown or not multiples of head size {head}"
    n_q, n_kv = int(widths[0]) // head, int(widths[1]) // head  # type: ignore[arg-type]
    if n_kv == 0 or n_q % n_kv:
        return f"{n_q} query heads are not a multiple of {n_kv} key/value heads"
    return n_q, n_kv, head


class DecoderGqaFusion(pattern.RewriteRuleClassBase):
    def __init__(self, name: str, repeat: bool) -> None:
        # remove_nodes=False: the exporter reads shapes of intermediate values (Shape of the rotated K
        # feeds repeat_kv's Expand target), which would block the rewrite; matched nodes that end up
        # unused are removed by the dead-node sweep right after.
        super().__init__(name, remove_nodes=False)
        self._repeat = repeat

    def pattern(
        self,
        op,
        q_lin,
        k_lin,
        v_lin,
        shape_q,
        shape_k,
        shape_v,
        shape_o,
        cos,
        sin,
        cos_axes,
        sin_axes,
        scale,
        mask,
    ):  # type: ignore[no-untyped-def]
        shapes = (shape_q, shape_k, shape_v)
        q, k, v = rotated_qkv_pattern(op, q_lin, k_lin, v_lin, shapes, cos, sin, cos_axes, sin_axes)
        k = repeat_kv_pattern(op, k, self._repeat, "k_rep")
        v = repeat_kv_pattern(op, v, self._repeat, "v_rep")
        scores = op.Mul(op.MatMul(q, op.Transpose(k, perm=[0, 1, 3, 2])), scale)
        probs = op.Softmax(op.Add(scores, mask), _outputs=["probs"])
        context = op.Transpose(op.MatMul(probs, v), perm=[0, 2, 1, 3])
        return op.Reshape(context, shape_o, _allow_other_attributes=True)

    def check(
        self, context, q_lin, k_lin, v_lin, shape_q, shape_k, shape_v, cos, sin, scale, mask, probs, **vs
    ) -> pattern.MatchResult:  # type: ignore[no-untyped-def]
        result = pattern.MatchResult()
        if probs.producer().attributes.get_int("axis", -1) not in (-1, 3):
            return result.fail("Softmax is not over the key axis")
        if scalar_value(scale) is None:
            return result.fail("attention scale is not a constant scalar", scale)
        heads = layer_heads(q_lin, k_lin, v_lin, (shape_q, shape_k, shape_v))
        if isinstance(heads, str):
            return result.fail(heads)
        head = heads[2]
        if head % 16:
            return result.fail(f"head size {head}: ONNX Runtime's GroupQueryAttention needs a multiple of 16")
        for table in (cos, sin):
            if table.shape is None or table.shape.rank() != 3 or table.shape[0] != 1:
                return result.fail("rotary table is not [1, S, head_size] (per-batch positions?)", table)
        problem = rotary_problem(cos, sin, head, vs)
        if problem:
            return result.fail(problem)
        problem = attention_bias_problem(mask)
        if problem:
            return result.fail(problem, mask)
        return result

    def rewrite(self, op, q_lin, k_lin, v_lin, shape_q, cos, sin, scale, mask, **_):  # type: ignore[no-untyped-def]
        head = head_size_from_reshape(shape_q)
        batch = op.Shape(q_lin, start=0, end=1)
        seq = op.Shape(q_lin, start=1, end=2)
        seqlens_k = op.Cast(op.Expand(op.Sub(seq, op.Constant(value_ints=[1])), batch), to=ir.DataType.INT32)
        total = op.Cast(op.Squeeze(seq), to=ir.DataType.INT32)

        def cache(table):  # type: ignore[no-untyped-def]
            squeezed = op.Squeeze(table, op.Constant(value_ints=[0]))
            zero, half, one = (op.Constant(value_ints=[n]) for n in (0, head // 2, 1))
            return op.Slice(squeezed, zero, half, one)

        return op.GroupQueryAttention(
            q_lin,
            k_lin,
            v_lin,
            None,
            None,
            seqlens_k,
            total,
            cache(cos),
            cache(sin),
            None,
            mask,
            num_heads=q_lin.shape[-1] // head,
            kv_num_heads=k_lin.shape[-1] // head,
            scale=scalar_value(scale),
            do_rotary=1,
            rotary_interleaved=0,
            _domain="com.microsoft",
        )


class FuseGroupQueryAttention(RewriteRulesPass):
    name = "fuse-gqa"

    def rules(self) -> Sequence[pattern.RewriteRule]:
        # No .commute(): the exporter writes this block in one operand order, and commuting its ten
        # binary ops would multiply the rules by 2^10.
        return [
            DecoderGqaFusion.rule("DecoderGQA[repeat_kv]", repeat=True),
            DecoderGqaFusion.rule("DecoderGQA[same_heads]", repeat=False),
        ]
