"""MatMul with a constant weight -> MatMul(x, DequantizeLinear(int4 W, scales, axis=0, block_size)) (tensorrt).

TensorRT 10+ reads weight-only INT4 in exactly this form (its "INT4 weight-only quantization": a constant
INT4 weight, a DequantizeLinear at opset >= 21 with `block_size` along K, block-shaped scales
[K / block_size, N], positive, zero point absent or 0; the activations stay in fp16/fp32). The values
arrive already quantized (exporter/quantize/blocks.py `tensorrt_blocks`), keyed by MatMul node name; ONNX
Runtime executes this graph as exactly that dequantized arithmetic (tests/test_int4.py checks it).

Where K is not a multiple of the block, the caller pads x's last axis (Pad) and the weight gets zero rows:
the extra products are 0 · 0, so the arithmetic is the unpadded one.
An 8-bit weight (`block_size` 0) becomes INT8 weight-only per output channel instead: DequantizeLinear(int8 W,
scales [N], axis=1), TensorRT's other weight-only form (its block quantization is INT4 only).
The model must already be at opset >= 21 (the caller converts it: onnx.version_converter). Scales keep
their dtype (the caller rounds them to float16 values, which the fp16 network TensorRT builds reads exactly). Running the pass again changes
nothing: the named MatMuls read a DequantizeLinear, not an initializer, afterwards.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np
import onnx_ir as ir

from graph_passes.base import GraphPass, PassReport

MIN_OPSET = 21


@dataclasses.dataclass(frozen=True)
class DequantizedWeight:
    """Signed values [K, N] (int4 range with a block size; int8 per output channel with block_size 0) and
    their scales ([K / block_size, N], or [N])."""

    values: np.ndarray
    scales: np.ndarray
    block_size: int


class MatMulToBlockwiseDequantize(GraphPass):
    name = "matmul-to-blockwise-dequantize"

    def __init__(self, weights: Mapping[str, DequantizedWeight]) -> None:
        """`weights`: MatMul node name -> its quantized weight."""
        super().__init__()
        self.weights = weights

    def apply(self, model: ir.Model, report: PassReport) -> None:
        opset = model.opset_imports.get("", 0)
        if opset < MIN_OPSET:
            raise ValueError(f"blocked DequantizeLinear needs opset >= {MIN_OPSET}; the model is at {opset}")
        graph = model.graph
        for node in list(graph):
            if node.op_type != "MatMul" or node.name not in self.weights:
                continue
            old = node.inputs[1]
            if old is None or old.const_value is None or old.producer() is not None:
                continue  # already dequantized (second run) or not a constant weight
            entry = self.weights[node.name]
            values, block_size = entry.values, entry.block_size
            k, n = tuple(old.shape or (0, 0))
            padded = values.shape[0] > k and not values[k:].any() and _reads_a_pad(node)
            if values.shape[1] != n or (values.shape[0] != k and not padded):
                raise ValueError(
                    f"{node.name}: weight {old.name} is {old.shape}, quantized as {values.shape}"
                )
            dtype, kind = (ir.DataType.INT4, "int4") if block_size else (ir.DataType.INT8, "int8")
            weight = _initializer(graph, f"{old.name}_{kind}", dtype, values)
            scale = _initializer(graph, f"{old.name}_{kind}_scale", None, entry.scales)
            attributes = {"axis": 0, "block_size": int(block_size)} if block_size else {"axis": 1}
            dequantize = ir.node(
                "DequantizeLinear",
                inputs=[weight, scale],
                attributes=attributes,
                name=f"{node.name}_weight_dq",
            )
            dequantize.outputs[0].name = f"{old.name}_{kind}_dequantized"
            graph.insert_before(node, dequantize)
            node.replace_input_with(1, dequantize.outputs[0])
            if not old.uses() and old.name in graph.initializers:
                del graph.initializers[old.name]
            report.counts[f"DequantizeLinear_{kind}"] = report.counts.get(f"DequantizeLinear_{kind}", 0) + 1
            report.details.append({"node": node.name, "shape": list(values.shape), "block_size": block_size})


def _reads_a_pad(node: ir.Node) -> bool:
    """x reaches the MatMul through a Pad of its last axis (zero rows of W then meet zero columns of x)."""
    pad = node.inputs[0].producer() if node.inputs[0] is not None else None
    return pad is not None and pad.op_type == "Pad"


def _initializer(graph: ir.Graph, name: str, dtype: ir.DataType | None, array: np.ndarray) -> ir.Value:
    tensor = ir.tensor(array, dtype=dtype, name=name)
    value = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(tensor.dtype))
    value.const_value = tensor
    graph.register_initializer(value)
    return value
