"""MatMul with a constant weight -> com.microsoft.MatMulNBits (ONNX Runtime CPU weight-only INT4/INT8).

Identity: MatMul(x, W) = MatMulNBits(x, B, scales) when B/scales are W's symmetric block quantization
(exporter/quantize/blocks.py) and W is replaced by what they dequantize to: (code - 2^(bits-1))·scale per
(output column, block of K). The pass only rewrites; the weights arrive already quantized, keyed by the
MatMul's node name (`weights`), so the arithmetic is decided (and tested bit-exact) elsewhere.

`accuracy_level` 4 lets ONNX Runtime quantize the activations to int8 per block and run int8 dot products
(the fast path on AVX512-VNNI / AVX2 CPUs); 0 computes in fp32 with the dequantized weight.
The weight initializer goes when nothing else reads it. Running the pass again changes nothing: the
named MatMuls are gone.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

import numpy as np
import onnx_ir as ir

from graph_passes.base import GraphPass, PassReport

MS_DOMAIN = "com.microsoft"


class NBitsWeight(Protocol):
    """A block-quantized weight in MatMulNBits' layout (exporter.quantize.blocks.BlockQuantized)."""

    packed: np.ndarray  # uint8 [N, k_blocks, block_size * bits // 8]
    scales: np.ndarray  # float32 [N, k_blocks]
    k: int
    bits: int
    block_size: int


class MatMulToNBits(GraphPass):
    name = "matmul-to-nbits"

    def __init__(self, weights: Mapping[str, NBitsWeight], accuracy_level: int = 4) -> None:
        super().__init__()
        self.weights = weights
        self.accuracy_level = accuracy_level

    def apply(self, model: ir.Model, report: PassReport) -> None:
        graph = model.graph
        for node in list(graph):
            if (
                node.op_type != "MatMul"
                or node.domain not in ("", "ai.onnx")
                or node.name not in self.weights
            ):
                continue
            weight = self.weights[node.name]
            old = node.inputs[1]
            assert old is not None and old.shape is not None
            k, n = old.shape[-2], old.shape[-1]
            if (k, n) != (weight.k, weight.packed.shape[0]):
                raise ValueError(
                    f"{node.name}: weight {old.name} is [{k}, {n}], quantized as [{weight.k}, {weight.packed.shape[0]}]"
                )
            packed = _initializer(graph, f"{old.name}_Q{weight.bits}", weight.packed)
            scales = _initializer(graph, f"{old.name}_Q{weight.bits}_scales", weight.scales.reshape(-1))
            replacement = ir.node(
                "MatMulNBits",
                inputs=[node.inputs[0], packed, scales],
                attributes={
                    "K": int(k),
                    "N": int(n),
                    "bits": weight.bits,
                    "block_size": weight.block_size,
                    "accuracy_level": self.accuracy_level,
                },
                domain=MS_DOMAIN,
                name=f"{node.name}_Q{weight.bits}",
            )
            ir.convenience.replace_nodes_and_values(
                graph, node, [node], [replacement], node.outputs, replacement.outputs
            )
            if not old.uses() and old.name in graph.initializers:
                del graph.initializers[old.name]
            report.counts[f"MatMulNBits_{weight.bits}bit"] = (
                report.counts.get(f"MatMulNBits_{weight.bits}bit", 0) + 1
            )
            report.details.append({"node": node.name, "K": int(k), "N": int(n), "bits": weight.bits})
        if report.counts and MS_DOMAIN not in model.opset_imports:
            model.opset_imports[MS_DOMAIN] = 1


def _initializer(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    value = ir.Value(
        name=name, shape=ir.Shape(array.shape), type=ir.TensorType(ir.DataType.from_numpy(array.dtype))
    )
    value.const_value = ir.tensor(array, name=name)
    graph.register_initializer(value)
    return value
