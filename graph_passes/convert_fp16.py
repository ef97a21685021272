"""FP16 written into the graph, for TensorRT's strongly typed networks (TensorRT 11 has no FP16 flag).

A strongly typed TensorRT network computes each layer in the type its tensors have, so an fp32
ONNX builds an fp32 engine. This pass makes the graph say FP16: float32 weights and constants
become float16, float32 activations become float16, and Cast nodes are placed at the borders of
the ops that stay fp32:

- LayerNormalization and Softmax keep fp32 inputs (TensorRT warns that LayerNorm in FP16 may
  overflow and recommends running it in fp32; the softmax's exp/sum likewise). Their weights
  stay fp32; a Cast to float32 goes before them and a Cast to float16 after them.
- QuantizeLinear/DequantizeLinear stay fp32 below opset 19 (ONNX allows fp16 scales from 19).
- Graph inputs and outputs keep their float32 type (`keep_io_types`), so feeds do not change.

Constants are clamped into the fp16 range: the attention mask's `finfo(float32).min` would
otherwise become -inf and `0 * -inf` a NaN. Running the pass twice changes nothing the second
time: values already fp16 are left alone, and the Casts it wrote are recognised as borders.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import ShapeInferencePass

from graph_passes.base import GraphPass, GraphPassError, PassReport

FLOAT, FLOAT16 = ir.DataType.FLOAT, ir.DataType.FLOAT16
KEEP_FP32_OPS = frozenset({"LayerNormalization", "Softmax"})
FP16_MAX = float(np.finfo(np.float16).max)  # 65504
FP16_TINY = float(2.0**-24)  # smallest fp16 subnormal
CONSTANT_OPS = ("Constant", "ConstantOfShape")
# Inputs that ONNX types float32 whatever the data type (Resize's roi and scales).
FP32_ONLY_INPUTS = {("Resize", 1), ("Resize", 2), ("Upsample", 1)}


def to_fp16(array: np.ndarray) -> tuple[np.ndarray, int]:
    """float32 -> float16, clamping out-of-range and flushing nothing to zero; returns the count changed."""
    array = np.asarray(array, dtype=np.float32)
    clipped = np.clip(array, -FP16_MAX, FP16_MAX)
    tiny = (clipped != 0) & (np.abs(clipped) < FP16_TINY)
    clipped = np.where(tiny, np.sign(clipped) * FP16_TINY, clipped)
    changed = int(np.count_nonzero(clipped != array))
    return clipped.astype(np.float16), changed


class ConvertFp16Pass(GraphPass):
    """float32 -> float16 everywhere except the inputs/outputs of `keep_fp32_ops` (and graph I/O)."""

    name = "convert-fp16"

    def __init__(self, keep_fp32_ops: Iterable[str] = KEEP_FP32_OPS, keep_io_types: bool = True) -> None:
        super().__init__()
        self.keep_fp32_ops = frozenset(keep_fp32_ops)
        self.keep_io_types = keep_io_types

    def apply(self, model: ir.Model, report: PassReport) -> None:
        graph = model.graph
        if any(isinstance(a.value, ir.Graph) for n in graph for a in n.attributes.values()):
            raise GraphPassError(f"{self.name}: graphs with subgraphs (If/Loop/Scan) are not supported")
        ShapeInferencePass()(model)
        keep = self.keep_fp32_ops | (
            {"QuantizeLinear", "DequantizeLinear"} if model.opset_imports.get("", 0) < 19 else set()
        )
        kept = [node for node in graph if self._is_kept(node, keep)]
        counts: Counter[str] = Counter()
        state = _Conversion(graph, frozenset(kept), self.keep_io_types, counts)
        state.run()
        report.counts.update({key: value for key, value in counts.items() if value})
        report.details.append({"kept_fp32": dict(Counter(node.op_type for node in kept))})

    @staticmethod
    def _is_kept(node: ir.Node, keep: Iterable[str]) -> bool:
        if node.domain not in ("", "ai.onnx"):
            return True  # unknown semantics: leave it as it is
        if node.op_type in keep:
            return True
        float_out = any(_is(v, FLOAT) for v in node.outputs)
        float_in = any(_is(v, FLOAT) or _is(v, FLOAT16) for v in node.inputs if v is not None)
        # A float output from no float input, other than by Cast/Constant: type fixed by an attribute.
        return float_out and not float_in and node.op_type not in ("Cast", *CONSTANT_OPS)


def _is(value: ir.Value | None, dtype: ir.DataType) -> bool:
    return value is not None and value.dtype == dtype


class _Conversion:
    """One run of the pass over a graph; `kept` are the nodes that stay fp32."""

    def __init__(
        self, graph: ir.Graph, kept: frozenset[ir.Node], keep_io: bool, counts: Counter[str]
    ) -> None:
        self.graph, self.kept, self.keep_io, self.counts = graph, kept, keep_io, counts
        self._fp32_casts: dict[ir.Value, ir.Value] = {}
        self._float_outputs = [value for value in graph.outputs if _is(value, FLOAT)]

    def needs_fp32(self, node: ir.Node, index: int) -> bool:
        return node in self.kept or (node.op_type, index) in FP32_ONLY_INPUTS

    def run(self) -> None:
        self.convert_initializers()
        for node in list(self.graph):
            if node not in self.kept:
                self.convert_node(node)
        self.convert_graph_inputs()
        for node in list(self.graph):
            if node in self.kept:
                self.guard_kept(node)
        self.restore_graph_outputs()

    def convert_initializers(self) -> None:
        for value in list(self.graph.initializers.values()):
            if not _is(value, FLOAT) or value.const_value is None or value.is_graph_output():
                continue
            fp16_uses = [(n, i) for n, i in value.uses() if not self.needs_fp32(n, i)]
            if not fp16_uses:
                continue
            array, clamped = to_fp16(value.const_value.numpy())
            self.counts["values_clamped"] += clamped
            if len(fp16_uses) == len(value.uses()):
                value.const_value = ir.tensor(array, name=value.name)
                value.dtype = FLOAT16
                target = value
            else:
                target = ir.Value(
                    name=f"{value.name}_fp16", const_value=ir.tensor(array, name=f"{value.name}_fp16")
                )
                target.dtype, target.shape = FLOAT16, value.shape
                self.graph.register_initializer(target)
                for node, index in fp16_uses:
                    node.replace_input_with(index, target)
            self.counts["initializers_to_fp16"] += 1

    def convert_node(self, node: ir.Node) -> None:
        if node.op_type in CONSTANT_OPS:
            self.convert_constant(node)
        elif node.op_type == "Cast":
            out = node.outputs[0]
            stays_fp32 = out.is_graph_output() or all(self.needs_fp32(n, i) for n, i in out.uses())
            if _is(out, FLOAT) and not stays_fp32:
                node.attributes["to"] = ir.AttrInt64("to", FLOAT16)
                out.dtype = FLOAT16
                self.counts["casts_retargeted"] += 1
        else:
            for out in node.outputs:
                if _is(out, FLOAT):
                    out.dtype = FLOAT16

    def convert_constant(self, node: ir.Node) -> None:
        attr = node.attributes.get("value")
        if attr is None or not isinstance(attr.value, ir.TensorProtocol) or attr.value.dtype != FLOAT:
            return
        array, clamped = to_fp16(attr.value.numpy())
        node.attributes["value"] = ir.AttrTensor("value", ir.tensor(array))
        node.outputs[0].dtype = FLOAT16
        self.counts["constants_to_fp16"] += 1
        self.counts["values_clamped"] += clamped

    def cast(self, value: ir.Value, to: ir.DataType, name: str) -> ir.Node:
        node = ir.node("Cast", [value], {"to": to}, name=name)
        node.outputs[0].name = name
        node.outputs[0].dtype, node.outputs[0].shape = to, value.shape
        self.counts["casts_inserted"] += 1
        return node

    def convert_graph_inputs(self) -> None:
        for value in self.graph.inputs:
            if not _is(value, FLOAT):
                continue
            uses = [(n, i) for n, i in value.uses() if n.op_type != "Cast" and not self.needs_fp32(n, i)]
            if not self.keep_io:
                value.dtype = FLOAT16
                continue
            if uses:
                cast = self.cast(value, FLOAT16, f"{value.name}_to_fp16")
                self.graph.insert_before(self.graph.node(0), cast)
                for node, index in uses:
                    node.replace_input_with(index, cast.outputs[0])

    def guard_kept(self, node: ir.Node) -> None:
        for index, value in enumerate(node.inputs):
            if _is(value, FLOAT16) and value is not None:
                if value not in self._fp32_casts:
                    cast = self.cast(value, FLOAT, f"{value.name}_to_fp32")
                    self.graph.insert_before(node, cast)
                    self._fp32_casts[value] = cast.outputs[0]
                node.replace_input_with(index, self._fp32_casts[value])
        for value in node.outputs:
            uses = [(n, i) for n, i in value.uses() if n.op_type != "Cast" and not self.needs_fp32(n, i)]
            if _is(value, FLOAT) and uses:
                cast = self.cast(value, FLOAT16, f"{value.name}_to_fp16")
                self.graph.insert_after(node, cast)
                for user, index in uses:
                    user.replace_input_with(index, cast.outputs[0])

    def restore_graph_outputs(self) -> None:
        if not self.keep_io:
            return
        for position, value in enumerate(list(self.graph.outputs)):
            if value not in self._float_outputs or not _is(value, FLOAT16) or value.producer() is None:
                continue
            if value.name is None:
                continue
            name = value.name
            value.name = f"{name}_fp16"
            cast = self.cast(value, FLOAT, name)
            self.graph.append(cast)
            self.graph.outputs[position] = cast.outputs[0]
