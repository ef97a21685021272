"""Residual-bias folding (onnxruntime target): the output projection's bias moves into the LayerNorm
that produced the residual, and one Add per sublayer leaves the graph.

Identity (post-norm BERT sublayer, r = LayerNorm(..., gamma, beta) feeding a linear consumer f and the
residual):
    y = (h·W + b) + r,   f(r) = r·V + c
    ==  h·W + r',        f = r'·V + (c − b·V)     with r' = LayerNorm(..., gamma, beta + b) = r + b
so the bias add of every attention-output and FFN-output projection is absorbed: r' carries b, and each
other consumer of r, which must be affine in r with constant weights (fused `Attention`: packed QKV
weights and bias; `MatMul` + `BiasGelu`: the FFN's first linear), gets b·V subtracted from its bias.
ONNX Runtime has no fast CPU kernel for "MatMul + bias + residual" (its SkipLayerNormalization measured
slower than Add + LayerNorm here), so removing the Add's pass over [B, S, H] is what is left to gain.
Anything else reading r (a graph output, a non-constant weight, Q/DQ) leaves that sublayer as it is.

A sublayer the restructure removed whole (exporter/restructure/families/sublayers.py) leaves
`LayerNorm(r + c)` with a constant c: when nothing but that Add reads r, the same identity with no
consumer to correct moves c into r's beta (r' = LayerNorm(..., beta + c) = r + c) and the Add goes.
Changed constants are new initializers: CSE may have shared the old ones between layers.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from graph_passes._rules import constant_array
from graph_passes.base import GraphPass, PassReport

# op type -> index of its beta input, for the norms whose output can absorb a bias
_NORMS = {("", "LayerNormalization"): 2, ("com.microsoft", "EmbedLayerNormalization"): 6}


def _biased_matmul(value: ir.Value) -> tuple[ir.Node, ir.Node, np.ndarray] | None:
    """(Add, MatMul, b) if `value` = Add(MatMul(h, W), b) with a constant 1-D b, used once."""
    add = value.producer()
    if add is None or add.op_type != "Add" or add.domain != "" or len(value.uses()) != 1:
        return None
    for i in (0, 1):
        bias, matmul = constant_array(add.inputs[i]), add.inputs[1 - i].producer()
        if bias is not None and bias.ndim == 1 and matmul is not None and matmul.op_type == "MatMul":
            return add, matmul, bias
    return None


def _consumer_bias(node: ir.Node, index: int) -> tuple[ir.Node, int, np.ndarray, np.ndarray] | None:
    """(node holding the bias, its input index, V, c) for a consumer f(r) = r·V + c, else None."""
    if node.domain == "com.microsoft" and node.op_type == "Attention" and index == 0:
        weight, bias = constant_array(node.inputs[1]), constant_array(node.inputs[2])
        return (node, 2, weight, bias) if weight is not None and bias is not None else None
    if node.op_type != "MatMul" or node.domain != "" or index != 0 or len(node.outputs[0].uses()) != 1:
        return None
    weight = constant_array(node.inputs[1])
    gelu, position = node.outputs[0].uses()[0]
    if weight is None or gelu.op_type != "BiasGelu" or position != 0:
        return None
    bias = constant_array(gelu.inputs[1])
    return (gelu, 1, weight, bias) if bias is not None else None


def _new_constant(graph: ir.Graph, owner: ir.Node, like: ir.Value, array: np.ndarray) -> ir.Value:
    """A new initializer (named after the node it feeds: the old one may be shared)."""
    name = f"{like.name}_folded_for_{owner.name or id(owner)}"
    value = ir.Value(name=name, const_value=ir.tensor(array.astype(np.float32)))
    graph.register_initializer(value)
    return value


class FoldResidualBias(GraphPass):
    name = "fold-residual-bias"

    def apply(self, model: ir.Model, report: PassReport) -> None:
        graph, folded = model.graph, 0
        for node in list(graph):
            if node.op_type == "Add" and node.domain == "":
                folded += self._fold(graph, node) or self._fold_constant(graph, node)
        if folded:
            common_passes.RemoveUnusedNodesPass()(model)  # the replaced betas and biases
            report.counts = {"Add": -folded, "folded": folded}

    def _fold(self, graph: ir.Graph, residual_add: ir.Node) -> bool:
        for i in (0, 1):
            biased, skip = _biased_matmul(residual_add.inputs[i]), residual_add.inputs[1 - i]
            norm = skip.producer() if biased is not None and skip is not None else None
            if norm is None or (norm.domain, norm.op_type) not in _NORMS or skip is not norm.outputs[0]:
                continue
            beta_index = _NORMS[(norm.domain, norm.op_type)]
            if len(norm.inputs) <= beta_index or norm.inputs[beta_index] is None:
                continue  # a LayerNorm without bias (ONNX allows it)
            beta = constant_array(norm.inputs[beta_index])
            bias_add, matmul, bias = biased
            others = [use for use in skip.uses() if use.node is not residual_add]
            consumers = [_consumer_bias(use.node, use.idx) for use in others]
            if skip.is_graph_output() or beta is None or beta.shape != bias.shape or None in consumers:
                continue
            new_beta = _new_constant(graph, norm, norm.inputs[beta_index], beta + bias)
            norm.replace_input_with(beta_index, new_beta)
            for holder, index, weight, old in consumers:  # type: ignore[misc]
                new_bias = _new_constant(graph, holder, holder.inputs[index], old - bias @ weight)
                holder.replace_input_with(index, new_bias)
            residual_add.replace_input_with(i, matmul.outputs[0])
            graph.remove(bias_add, safe=True)
            return True
        return False

    def _fold_constant(self, graph: ir.Graph, add: ir.Node) -> bool:
        """Add(r, c), c a constant 1-D vector, r a norm's output read by nothing else: c into its beta."""
        for i in (0, 1):
            skip, constant = add.inputs[i], constant_array(add.inputs[1 - i])
            norm = skip.producer() if skip is not None else None
            if constant is None or constant.ndim != 1 or norm is None:
                continue
            if (norm.domain, norm.op_type) not in _NORMS or skip is not norm.outputs[0]:
                continue
            beta_index = _NORMS[(norm.domain, norm.op_type)]
            if len(norm.inputs) <= beta_index or norm.inputs[beta_index] is None:
                continue
            beta = constant_array(norm.inputs[beta_index])
            if (
                beta is None
                or beta.shape != constant.shape
                or len(skip.uses()) != 1
                or skip.is_graph_output()
            ):
                continue
            if add.outputs[0].is_graph_output():
                continue
            norm.replace_input_with(
                beta_index, _new_constant(graph, norm, norm.inputs[beta_index], beta + constant)
            )
            ir.convenience.replace_all_uses_with(add.outputs[0], skip)
            graph.remove(add, safe=True)
            return True
        return False
