"""Pre-build checks: what TensorRT's ONNX parser would reject, found before a GPU is involved.

TensorRT supports symmetric quantization only: Q/DQ zero points must be 0 and scales positive
(onnx-tensorrt's operator matrix; the parser error of TensorRT #2774 otherwise). Its parser
knows the standard ONNX domain only, so ONNX Runtime's contrib ops (com.microsoft: the fusions
of the CPU pipeline) and integer-arithmetic ops (MatMulInteger from dynamic quantization) fail
it. Each problem names the node, so the user can find it in Netron.

INT4 (TensorRT 10+, weight-only; its "Working with quantized types" and the Quantize/Dequantize operator
pages): signed INT4 only (no UINT4), read from DequantizeLinear at opset >= 21, whose quantized input is a
constant weight feeding a GEMM (MatMul/Gemm), never an activation (no QuantizeLinear to INT4); block
quantization is for INT4 only, along one axis of a 2-D weight, with scales of the weight's rank whose
blocked dimension is K / block_size. We also require K to be a multiple of block_size (the exporter pads
K with zero rows and x with a Pad): TensorRT's blocked layers state that divisibility, and a ragged last
block is where parsers differ.
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


INT4_TYPES = {onnx.TensorProto.INT4: "INT4", onnx.TensorProto.UINT4: "UINT4"}
INT4_MIN_OPSET = 21
GEMM_OPS = ("MatMul", "Gemm")


def _opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in STANDARD_DOMAINS), 0)


def _attribute(node: onnx.NodeProto, name: str, default: int) -> int:
    return next((a.i for a in node.attribute if a.name == name), default)


def _check_int4(
    model: onnx.ModelProto, node: onnx.NodeProto, name: str, consumers: dict[str, list[onnx.NodeProto]]
) -> list[BuildProblem]:
    """TensorRT's INT4 rules for one Q/DQ node (empty when it does not involve INT4 or blocks)."""
    inits = {i.name: i for i in model.graph.initializer}
    problem = lambda text: BuildProblem(name, node.op_type, text)  # noqa: E731
    if node.op_type == "QuantizeLinear":
        zero = inits.get(node.input[2]) if len(node.input) > 2 else None
        to_int4 = _attribute(node, "output_dtype", 0) in INT4_TYPES or (
            zero is not None and zero.data_type in INT4_TYPES
        )
        return (
            [
                problem(
                    "quantizes to INT4: TensorRT's INT4 is weight-only (constant weights through DequantizeLinear)"
                )
            ]
            if to_int4
            else []
        )
    weight = inits.get(node.input[0])
    kind = INT4_TYPES.get(weight.data_type) if weight is not None else None
    block = _attribute(node, "block_size", 0)
    if kind is None:
        return (
            [
                problem(
                    f"block quantization (block_size {block}) of a non-INT4 input: TensorRT blocks INT4 only"
                )
            ]
            if block
            else []
        )
    assert weight is not None
    problems = []
    if kind == "UINT4":
        problems.append(
            problem(f"weight {weight.name!r} is UINT4: TensorRT's INT4 is signed (symmetric, zero point 0)")
        )
    if _opset(model) < INT4_MIN_OPSET:
        problems.append(
            problem(f"INT4 DequantizeLinear needs opset >= {INT4_MIN_OPSET}, the model is at {_opset(model)}")
        )
    readers = consumers.get(node.output[0], [])
    if not readers or any(
        r.op_type not in GEMM_OPS or list(r.input).index(node.output[0]) != 1 for r in readers
    ):
        problems.append(
            problem(
                "INT4 weight does not feed a MatMul/Gemm weight input: TensorRT's INT4 is weight-only for GEMMs"
            )
        )
    if block:
        problems.extend(
            problem(text) for text in _block_problems(node, weight, inits.get(node.input[1]), block)
        )
    return problems


def _block_problems(
    node: onnx.NodeProto, weight: onnx.TensorProto, scale: onnx.TensorProto | None, block: int
) -> list[str]:
    dims = list(weight.dims)
    if len(dims) != 2:
        return [f"blocked INT4 weight {weight.name!r} has rank {len(dims)}: TensorRT blocks 2-D weights"]
    axis = _attribute(node, "axis", 1) % 2
    if scale is None:
        return [f"scale {node.input[1]!r} is not a constant: TensorRT needs build-time block scales"]
    if len(scale.dims) != 2:
        return [
            f"scale {scale.name!r} has rank {len(scale.dims)}: block scales must have the weight's rank (2)"
        ]
    problems = []
    if dims[axis] % block:
        problems.append(
            f"blocked axis {axis} of {weight.name!r} has {dims[axis]} elements, not a multiple of block_size {block}"
        )
    expected = list(dims)
    expected[axis] = -(-dims[axis] // block)
    if list(scale.dims) != expected:
        problems.append(
            f"scale {scale.name!r} shape {list(scale.dims)} != {expected} (weight {dims}, block {block} on axis {axis})"
        )
    return problems


def prebuild_check(model: onnx.ModelProto) -> list[BuildProblem]:
    """Everything in `model`'s main graph that TensorRT's parser would reject (empty list: fine)."""
    constants = _constants(model)
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for value in node.input:
            consumers.setdefault(value, []).append(node)
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
            problems.extend(_check_int4(model, node, name, consumers))
    return problems
