"""Add(residual, x) -> SimplifiedLayerNormalization  ==>  com.microsoft.SkipSimplifiedLayerNormalization
(the INT4 CPU file's decode graph).

Why: ONNX Runtime 1.32's own optimizer leaves our residual Adds unfused (measured: 19 Add + 17
SimplifiedLayerNormalization nodes run per decode step of the 8-layer model), and at batch 1 each node costs
a few microseconds of dispatch; onnxruntime-genai's builder writes the fused op. One node per norm instead of
two, 16 per step on 8 layers.

Identity: SkipSimplifiedLayerNormalization(input, skip, gamma) returns (y, _, _, input + skip) with
y = RMSNorm(input + skip)·gamma, epsilon as the norm's; its fourth output replaces the Add's output for every
other reader (the next residual Add). Matched only where the norm normalizes the last axis (axis -1) in
fp32 (stash_type 1), the Add has two non-constant inputs (both [B, S, H] activations in a decoder layer)
and the Add's output is no graph output. Checked numerically in tests/test_int4.py.
"""

from __future__ import annotations

import onnx
from onnx import helper

from exporter.quantize.subgraph import GraphIndex

MS_DOMAIN = "com.microsoft"


def fuse_skip_norms(model: onnx.ModelProto) -> int:
    """Rewrite, in place, every matching Add + SimplifiedLayerNormalization; returns how many."""
    graph = model.graph
    index = GraphIndex.of(graph)
    inits, producer, outputs = set(index.inits), index.producer, index.outputs
    replaced: dict[str, onnx.NodeProto] = {}
    removed: set[str] = set()
    for norm in graph.node:
        if norm.op_type != "SimplifiedLayerNormalization" or norm.domain not in ("", "ai.onnx"):
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in norm.attribute}
        if attrs.get("axis", -1) != -1 or attrs.get("stash_type", 1) != 1 or len(norm.input) != 2:
            continue
        add = producer.get(norm.input[0])
        if (
            add is None
            or add.op_type != "Add"
            or add.domain not in ("", "ai.onnx")
            or add.name in replaced
            or any(i in inits or not i for i in add.input)
            or add.output[0] in outputs
            or len(norm.output) != 1
        ):
            continue
        fused = helper.make_node(
            "SkipSimplifiedLayerNormalization",
            [add.input[0], add.input[1], norm.input[1]],
            [norm.output[0], "", "", add.output[0]],
            name=f"{norm.name}_skip",
            domain=MS_DOMAIN,
            epsilon=float(attrs.get("epsilon", 1e-5)),
        )
        replaced[add.name] = fused  # at the Add's place: its inputs are ready there, gamma is constant
        removed.add(norm.name)
    if not replaced:
        return 0
    nodes = [replaced.get(n.name, n) for n in graph.node if n.name not in removed]
    del graph.node[:]
    graph.node.extend(nodes)
    if not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    return len(replaced)
