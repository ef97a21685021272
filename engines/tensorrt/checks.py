"""Pre-build checks: what TensorRT's ONNX parser would reject, found before a GPU is involved.

TensorRT supports symmetric quantization only: Q/DQ zero points must be 0 and scales positive
(onnx-tensorrt's operator matrix; the parser error of TensorRT #2774 otherwise). Its parser
knows the standard ONNX domain only, so ONNX Runtime's contrib ops (com.microsoft: the fusions
of the CPU pipeline) and integer-arithmetic ops (MatMulInteger from dynamic quantization) fail
it. Each problem names the node, so the user can find it in Netron.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
from onnx import numpy_helper

STANDARD_DOMAINS = ("", "ai.onnx")
# Marked unsupported ("N") in onnx-tensorrt's docs/operators.md; the parser remains the authority.
UNSUPPORTED_OPS = frozenset(
    {
        "ConvInteger",
        "MatMulInteger",
        "QLinearConv",
        "QLinearMatMul",
        "DynamicQuantizeLinear",
        "StringNormalizer",
        "TfIdfVectorizer",
        "SequenceAt",
        "SequenceConstruct",
        "SequenceEmpty",
        "SequenceErase",
        "SequenceInsert",
        "SequenceLength",
        "SplitToSequence",
        "ConcatFromSequence",
    }
)


@dataclasses.dataclass(frozen=True)
class BuildProblem:
    """One reason TensorRT would refuse the graph, naming the node."""

    node: str
    op_type: str
    problem: str

    def __str__(self) -> str:
        return f"node {self.node!r} ({self.op_type}): {self.problem}"


def _constants(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    # Q/DQ scales and zero points are always stored inline; weights in external data are not needed here
    values = {
        init.name: numpy_helper.to_array(init)
        for init in model.graph.initializer
        if not onnx.external_data_helper.uses_external_data(init)
    }
    for node in model.graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    values[node.output[0]] = numpy_helper.to_array(attr.t)
    return values


def _check_qdq(node: onnx.NodeProto, name: str, constants: dict[str, np.ndarray]) -> list[BuildProblem]:
    problems: list[BuildProblem] = []
    scale = constants.get(node.input[1]) if len(node.input) > 1 else None
    if scale is not None and not (np.all(np.isfinite(scale)) and np.all(scale > 0)):
        bad = scale[~(np.isfinite(scale) & (scale > 0))] if scale.ndim else scale
        problems.append(
            BuildProblem(
                name,
                node.op_type,
                f"scale {node.input[1]!r} has non-positive or non-finite values {bad.ravel()[:4]}",
            )
        )
    zero_point = constants.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    if zero_point is not None and np.any(zero_point != 0):
        problems.append(
            BuildProblem(
                name,
                node.op_type,
                f"zero point {node.input[2]!r} is not 0 ({zero_point.ravel()[:4]}): TensorRT supports symmetric quantization only",
            )
        )
    return problems


def prebuild_check(model: onnx.ModelProto) -> list[BuildProblem]:
    """Everything in `model`'s main graph that TensorRT's parser would reject (empty list: fine)."""
    constants = _constants(model)
    problems: list[BuildProblem] = []
    for index, node in enumerate(model.graph.node):
        name = node.name or f"#{index} -> {node.output[0] if node.output else '?'}"
        if node.domain not in STANDARD_DOMAINS:
            problems.append(
                BuildProblem(
                    name,
                    node.op_type,
                    f"op domain {node.domain!r} is not standard ONNX; TensorRT's parser cannot read it "
                    "(build TensorRT engines from the ONNX before ONNX Runtime fusions)",
                )
            )
        elif node.op_type in UNSUPPORTED_OPS:
            problems.append(
                BuildProblem(name, node.op_type, "TensorRT's ONNX parser does not support this op")
            )
        elif node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            problems.extend(_check_qdq(node, name, constants))
    return problems
