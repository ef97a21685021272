"""Encoder self-attention fusion (onnxruntime target): -> com.microsoft Attention, or MultiHeadAttention.

Identity (BERT eager attention, per layer):
    q, k, v = (x·Wq + bq), (x·Wk + bk), (x·Wv + bv), each reshaped to [B, S, n, h]
    out = reshape(softmax(scale · q·kᵀ + mask) · v, [B, S, n·h])
which is ONNX Runtime's `Attention(x, [Wq|Wk|Wv], [bq|bk|bv], attention_bias=mask, num_heads=n, scale)`:
one packed QKV GEMM instead of three, and the score/softmax/context loop in one kernel.

Head counts are per layer: h is read from the layer's own Reshape target ([B, S, -1, h]) and n = width
of Wq / h, so head-pruned layers (8 heads in layer 0, 5 in layer 1) each get their own `num_heads`.
The mask: when it is the exporter's padding mask, `(1 - float(m[:, None, None, :])) · NEG` of a 2-D
[B, S] graph input `m` (exporter.export.torch_to_onnx.additive_padding_mask), the kernel gets `m` itself as its
2-D `mask_index` (MultiHeadAttention: `key_padding_mask`) with `mask_filter_value = NEG`: the kernel then
adds exactly NEG at padded keys, the same numbers, and the mask arithmetic leaves the graph. Any other
additive mask is passed through unchanged as `attention_bias`, which ONNX Runtime requires to be
[B or 1, 1 or num_heads, S, S]; other shapes are left unfused with that reason. When Q/K/V weights are not constants (e.g. Q/DQ-quantized
weights after INT8 insertion), the projections are left in the graph (keeping their Q/DQ) and only
the attention core becomes `MultiHeadAttention(q, k, v, attention_bias=mask, num_heads=n, scale)`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import pattern

from graph_passes._rules import (
    RewriteRulesPass,
    attention_bias_problem,
    constant_array,
    head_size_from_reshape,
    scalar_value,
)


def linear_parts(value: ir.Value) -> tuple[ir.Value, np.ndarray, np.ndarray | None] | None:
    """(x, W, b) if `value` is MatMul(x, W) [+ b] with constant 2-D W and 1-D b, else None."""
    node = value.producer()
    bias = None
    if node is not None and node.op_type == "Add" and node.domain == "":
        for i in (0, 1):
            candidate = constant_array(node.inputs[i])
            other = node.inputs[1 - i].producer()
            if (
                candidate is not None
                and candidate.ndim == 1
                and other is not None
                and other.op_type == "MatMul"
            ):
                bias, node = candidate, other
                break
        else:
            return None
    if node is None or node.op_type != "MatMul" or node.domain != "":
        return None
    weight = constant_array(node.inputs[1])
    if weight is None or weight.ndim != 2:
        return None
    if bias is not None and bias.shape[0] != weight.shape[1]:
        return None
    return node.inputs[0], weight, bias


def _is_unsqueeze(node: ir.Node | None) -> bool:
    return node is not None and node.op_type == "Unsqueeze"


def padding_mask_source(mask: ir.Value) -> tuple[ir.Value, float] | None:
    """(m, NEG) if `mask` is Mul(Sub(1, Cast(Unsqueeze(Unsqueeze(m)))), NEG) of a 2-D graph input m that
    puts it on axes 0 and 3 (i.e. m[:, None, None, :]), else None."""
    node = mask.producer()
    if node is None or node.op_type != "Mul" or len(node.inputs) != 2:
        return None
    negative = scalar_value(node.inputs[1])
    sub = node.inputs[0].producer()
    if negative is None or negative > -1e4 or sub is None or sub.op_type != "Sub":
        return None
    if scalar_value(sub.inputs[0]) != 1.0:
        return None
    cast = sub.inputs[1].producer()
    if cast is None or cast.op_type != "Cast":
        return None
    value, axes = cast.inputs[0], []
    while value is not None and _is_unsqueeze(value.producer()):
        axes.append(constant_array(value.producer().inputs[1]))
        value = value.producer().inputs[0]
    if value is None or not value.is_graph_input() or value.shape is None or value.shape.rank() != 2:
        return None
    if _unsqueezed(["batch", "key"], axes[::-1]) != ["batch", 1, 1, "key"]:  # m[:, None, None, :]
        return None
    return value, negative


def _unsqueezed(layout: list, steps: list[np.ndarray | None]) -> list | None:
    """`layout` after Unsqueezes with these axes, in the order applied (None: an axis not constant)."""
    for axes in steps:
        if axes is None:
            return None
        rank = len(layout) + axes.size
        for axis in sorted(int(a) % rank for a in axes.reshape(-1)):
            layout = [*layout[:axis], 1, *layout[axis:]]
    return layout


class EncoderAttentionFusion(pattern.RewriteRuleClassBase):
    def __init__(self, name: str, scale_op: str) -> None:
        super().__init__(name)
        self._scale_op = scale_op

    def pattern(self, op, q_lin, k_lin, v_lin, shape_q, shape_k, shape_v, shape_o, scale, mask):  # type: ignore[no-untyped-def]
        q = op.Transpose(op.Reshape(q_lin, shape_q, _allow_other_attributes=True), perm=[0, 2, 1, 3])
        k_t = op.Transpose(op.Reshape(k_lin, shape_k, _allow_other_attributes=True), perm=[0, 2, 3, 1])
        v = op.Transpose(op.Reshape(v_lin, shape_v, _allow_other_attributes=True), perm=[0, 2, 1, 3])
        scores = op.MatMul(q, k_t)
        scores = op.Mul(scores, scale) if self._scale_op == "mul" else op.Div(scores, scale)
        probs = op.Softmax(op.Add(scores, mask), _outputs=["probs"])
        context = op.Transpose(op.MatMul(probs, v), perm=[0, 2, 1, 3])
        return op.Reshape(context, shape_o, _allow_other_attributes=True)

    def check(
        self, context, q_lin, k_lin, v_lin, shape_q, shape_k, shape_v, scale, mask, probs, **_
    ) -> pattern.MatchResult:  # type: ignore[no-untyped-def]
        result = pattern.MatchResult()
        axis = probs.producer().attributes.get_int("axis", -1)
        if axis not in (-1, 3):
            return result.fail(f"Softmax over axis {axis}, not the key axis")
        if scalar_value(scale) is None:
            return result.fail("attention scale is not a constant scalar", scale)
        head_sizes = {head_size_from_reshape(s) for s in (shape_q, shape_k, shape_v)}
        if len(head_sizes) != 1 or None in head_sizes:
            return result.fail("head size is not the same static value in the Q/K/V reshapes")
        head_size = head_sizes.pop()
        widths = {v.shape[-1] if v.shape is not None else None for v in (q_lin, k_lin, v_lin)}
        if len(widths) != 1 or not isinstance(next(iter(widths)), int):
            return result.fail("Q/K/V projection widths are unknown or differ")
        if next(iter(widths)) % head_size:
            return result.fail(f"projection width is not a multiple of the head size {head_size}")
        problem = attention_bias_problem(mask)
        if problem:
            return result.fail(problem, mask)
        if padding_mask_source(mask) is None and mask.shape[2] == 1:
            return result.fail("additive mask broadcasts over query rows and is not a 2-D padding mask", mask)
        return result

    def rewrite(self, op, q_lin, k_lin, v_lin, shape_q, scale, mask, **_):  # type: ignore[no-untyped-def]
        head_size = head_size_from_reshape(shape_q)
        num_heads = q_lin.shape[-1] // head_size
        factor = scalar_value(scale)
        factor = factor if self._scale_op == "mul" else 1.0 / factor
        source = padding_mask_source(mask)
        masks: dict[str, Any] = {"bias": mask, "index": None, "attrs": {}}
        if source is not None:
            index = op.Cast(source[0], to=ir.DataType.INT32)
            masks = {"bias": None, "index": index, "attrs": {"mask_filter_value": source[1]}}
        parts = [linear_parts(v) for v in (q_lin, k_lin, v_lin)]
        if all(parts) and len({id(p[0]) for p in parts}) == 1:
            x = parts[0][0]
            weights = np.concatenate([p[1] for p in parts], axis=1).astype(np.float32)
            biases = [p[2] if p[2] is not None else np.zeros(p[1].shape[1], np.float32) for p in parts]
            width = parts[0][1].shape[1]
            return op.Attention(
                x,
                op.Constant(value=ir.tensor(weights)),
                op.Constant(value=ir.tensor(np.concatenate(biases).astype(np.float32))),
                masks["index"],
                None,
                masks["bias"],
                num_heads=num_heads,
                scale=factor,
                qkv_hidden_sizes=[width, width, width],
                _domain="com.microsoft",
                **masks["attrs"],
            )
        return op.MultiHeadAttention(
            q_lin,
            k_lin,
            v_lin,
            None,
            masks["index"],
            masks["bias"],
            num_heads=num_heads,
            scale=factor,
            _domain="com.microsoft",
            **masks["attrs"],
        )


class FuseAttention(RewriteRulesPass):
    name = "fuse-attention"

    def rules(self) -> Sequence[pattern.RewriteRule]:
        return [
            *EncoderAttentionFusion.rule("EncoderAttention[mul]", "mul").commute(),
            EncoderAttentionFusion.rule("EncoderAttention[div]", "div"),
        ]
