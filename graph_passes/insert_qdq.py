"""Insert QuantizeLinear/DequantizeLinear pairs where TensorRT wants them for explicit INT8.

TensorRT 10+ builds INT8 only from Q/DQ in the graph ("explicit quantization"); it fuses a DQ into the
consumer and a Q into the producer. Its rules, and so this pass's:
- symmetric INT8 only: zero point 0 (int8), positive scales;
- weights per channel along the output-channel axis (MatMul [K, N]: axis 1; Gemm: axis 0 if transB else 1;
  Conv [O, I, ...]: axis 0), stored as int8 initializers + DequantizeLinear (a 4x smaller file);
- activations per tensor: one Q/DQ pair per tensor, shared by all its quantized consumers;
- Q/DQ on the *inputs* of MatMul/Gemm/Conv, never on their outputs (the output stays high precision so the
  bias, residual and normalisation that follow are fused in fp16/fp32);
- attention MatMuls with two activation inputs (Q·Kᵀ, P·V) get both inputs quantized per tensor (TensorRT's
  fused MHA runs them in INT8); Softmax itself stays in high precision;
- residual Adds: an Add that feeds a LayerNormalization stays high precision (fused into the Add+LayerNorm
  kernel); an Add whose other operand comes from a quantized Conv gets Q/DQ on its skip input, so TensorRT
  fuses the Add into the Conv's epilogue (its ResNet recipe);
- LayerNorm, Softmax, GELU, the attention-mask path and every other op: untouched (high precision);
- exclusions by node name, op type or regex (and the sensitivity analysis's choices) keep a node unquantized.
Every candidate node gets a `Decision` naming the rule that decided; all go into the pass report.

The identity relied on: DQ(Q(x)) = clip(round(x / s), -127, 127) * s, so the quantized graph computes the
same function as the fp32 graph up to INT8 rounding; with the optimizations off ONNX Runtime executes exactly
that, which is how the accuracy of this graph is measured before TensorRT ever sees it.
"""

from __future__ import annotations

import dataclasses
import re
from collections import Counter
from collections.abc import Iterable

import numpy as np
import onnx_ir as ir

from graph_passes.base import GraphPass, GraphPassError, PassReport

COMPUTE_OPS = ("MatMul", "Gemm", "Conv")
INT8_MAX = 127


@dataclasses.dataclass(frozen=True)
class Exclusions:
    """Nodes kept in high precision: exact names, op types, or names matching any regex (re.search)."""

    names: frozenset[str] = frozenset()
    op_types: frozenset[str] = frozenset()
    regex: tuple[str, ...] = ()

    @classmethod
    def of(
        cls, names: Iterable[str] = (), op_types: Iterable[str] = (), regex: Iterable[str] = ()
    ) -> Exclusions:
        return cls(frozenset(names), frozenset(op_types), tuple(regex))

    def reason(self, node: ir.Node) -> str | None:
        """Why `node` is excluded, or None."""
        if node.name in self.names:
            return "excluded by name"
        if node.op_type in self.op_types:
            return f"excluded by op type {node.op_type}"
        for pattern in self.regex:
            if re.search(pattern, node.name or ""):
                return f"excluded by regex {pattern!r}"
        return None

    def with_names(self, extra: Iterable[str]) -> Exclusions:
        return dataclasses.replace(self, names=self.names | frozenset(extra))

    def __bool__(self) -> bool:
        """Whether anything is excluded at all."""
        return bool(self.names or self.op_types or self.regex)


@dataclasses.dataclass
class Decision:
    """What happens to one candidate node, and the rule that decided."""

    node: str
    op_type: str
    quantized: bool
    rule: str
    activations: list[str] = dataclasses.field(default_factory=list)  # per-tensor Q/DQ on these inputs
    weights: dict[str, int] = dataclasses.field(default_factory=dict)  # weight input -> per-channel axis

    def to_json(self) -> dict[str, object]:
        return dataclasses.asdict(self)


def plan(model: ir.Model, exclusions: Exclusions = Exclusions()) -> list[Decision]:
    """A decision for every MatMul/Gemm/Conv and every Add with two activation inputs, in graph order."""
    decisions: list[Decision] = []
    quantized_convs: set[str] = set()
    for node in model.graph:
        if node.op_type in COMPUTE_OPS:
            decision = _plan_compute(node, exclusions)
            if decision.quantized and node.op_type == "Conv":
                quantized_convs.add(node.name)
        elif node.op_type == "Add" and len(_activation_inputs(node)) == 2:
            decision = _plan_residual_add(node, exclusions, quantized_convs)
        else:
            continue
        decisions.append(decision)
    return decisions


def activation_tensors(decisions: Iterable[Decision]) -> list[str]:
    """The tensors that need a calibrated range (amax) for `decisions`."""
    return list(dict.fromkeys(t for d in decisions if d.quantized for t in d.activations))


def high_precision_ops(model: ir.Model) -> Counter[str]:
    """Op types the pass never quantizes, as found in the graph (LayerNorm, Softmax, GELU, mask ops...)."""
    skip = {*COMPUTE_OPS, "Add", "QuantizeLinear", "DequantizeLinear", "Constant"}
    return Counter(n.op_type for n in model.graph if n.op_type not in skip)


class InsertQDQ(GraphPass):
    """Apply `plan(model, exclusions)` with activation ranges `ranges` (tensor name -> amax)."""

    name = "insert-qdq"

    def __init__(self, ranges: dict[str, float], exclusions: Exclusions = Exclusions()) -> None:
        super().__init__()
        self.ranges = ranges
        self.exclusions = exclusions

    def apply(self, model: ir.Model, report: PassReport) -> None:
        decisions = plan(model, self.exclusions)
        missing = [t for t in activation_tensors(decisions) if t not in self.ranges]
        if missing:
            raise GraphPassError(
                f"{self.name}: no calibrated range for {missing[:5]} ({len(missing)} tensors)"
            )
        by_name = {n.name: n for n in model.graph}
        inserter = _Inserter(model.graph, self.ranges)
        for decision in decisions:
            if decision.quantized:
                inserter.quantize(by_name[decision.node], decision)
                report.counts[f"quantized:{decision.op_type}"] = (
                    report.counts.get(f"quantized:{decision.op_type}", 0) + 1
                )
        inserter.drop_unused_initializers()
        model.graph.sort()
        report.counts.update(inserter.counts)
        for op, count in high_precision_ops(model).items():
            report.details.append(
                {"op_type": op, "count": count, "rule": "not a MatMul/Gemm/Conv input: high precision"}
            )
        report.details.extend(d.to_json() for d in decisions)


def _plan_compute(node: ir.Node, exclusions: Exclusions) -> Decision:
    decision = Decision(node.name or "", node.op_type, quantized=False, rule="")
    data_inputs = [v for v in node.inputs[:2] if v is not None]
    if any(_is_dequantized(v) for v in data_inputs):
        decision.rule = "already has Q/DQ on its inputs"
        return decision
    if reason := exclusions.reason(node):
        decision.rule = reason
        return decision
    if any(v.type is not None and v.dtype not in (ir.DataType.FLOAT, None) for v in data_inputs):
        decision.rule = "inputs are not float32: left as is"
        return decision
    for index, value in enumerate(data_inputs):
        axis = _weight_axis(node, index, value)
        if axis is not None:
            decision.weights[value.name or ""] = axis
        elif value.const_value is None:
            decision.activations.append(value.name or "")
    decision.quantized = True
    if len(decision.activations) == 2:
        decision.rule = "activation x activation MatMul (attention): both inputs per-tensor"
    else:
        decision.rule = f"{node.op_type}: per-channel weights, per-tensor activation input"
    return decision


def _plan_residual_add(node: ir.Node, exclusions: Exclusions, quantized_convs: set[str]) -> Decision:
    decision = Decision(node.name or "", "Add", quantized=False, rule="")
    consumers = {c.op_type for v in node.outputs for c in v.consumers()}
    producers = [v.producer() for v in node.inputs if v is not None]
    if "Softmax" in consumers:
        decision.rule = "attention-mask Add (feeds Softmax): high precision"
    elif "LayerNormalization" in consumers:
        decision.rule = "residual Add feeding LayerNormalization: high precision (fused Add+LayerNorm)"
    elif reason := exclusions.reason(node):
        decision.rule = reason
    elif any(p is not None and p.name in quantized_convs for p in producers):
        skip = [
            v
            for v, p in zip(node.inputs, producers, strict=True)
            if p is None or p.name not in quantized_convs
        ]
        if skip and not any(_is_dequantized(v) for v in skip if v is not None):
            decision.quantized = True
            decision.activations = [v.name or "" for v in skip[:1] if v is not None]
            decision.rule = (
                "residual Add after a quantized Conv: Q/DQ on the skip input (TensorRT fuses the Add)"
            )
        else:
            decision.rule = "already has Q/DQ on its inputs"
    else:
        decision.rule = "elementwise Add: high precision (fused into its neighbours)"
    return decision


def _weight_axis(node: ir.Node, index: int, value: ir.Value) -> int | None:
    """The per-channel (output-channel) axis if input `index` is a constant weight, else None."""
    tensor = value.const_value
    if tensor is None or len(tensor.shape) < 2:
        return None
    if node.op_type == "Conv":
        return 0 if index == 1 else None
    if node.op_type == "Gemm":
        trans = node.attributes.get_int("transB", 0) if index == 1 else node.attributes.get_int("transA", 0)
        if index == 0:
            return None
        return 0 if trans else 1
    return len(tensor.shape) - 1 if index == 1 else None


def _is_dequantized(value: ir.Value | None) -> bool:
    producer = value.producer() if value is not None else None
    return producer is not None and producer.op_type == "DequantizeLinear"


def _activation_inputs(node: ir.Node) -> list[ir.Value]:
    return [v for v in node.inputs if v is not None and v.const_value is None and not _is_constant_node(v)]


def _is_constant_node(value: ir.Value) -> bool:
    producer = value.producer()
    return producer is not None and producer.op_type == "Constant"


class _Inserter:
    """Builds the Q/DQ nodes, sharing one pair per activation tensor and one DQ per weight."""

    def __init__(self, graph: ir.Graph, ranges: dict[str, float]) -> None:
        self.graph = graph
        self.ranges = ranges
        self.dequantized: dict[str, ir.Value] = {}
        self.replaced_weights: set[str] = set()
        self.counts: Counter[str] = Counter()

    def quantize(self, node: ir.Node, decision: Decision) -> None:
        for index, value in enumerate(node.inputs):
            if value is None:
                continue
            if value.name in decision.weights:
                node.replace_input_with(index, self._weight(node, value, decision.weights[value.name]))
            elif value.name in decision.activations:
                node.replace_input_with(index, self._activation(node, value))

    def _activation(self, node: ir.Node, value: ir.Value) -> ir.Value:
        name = value.name or ""
        if name not in self.dequantized:
            scale = self._initializer(f"{name}_scale", np.array(_scale(self.ranges[name]), dtype=np.float32))
            zero = self._initializer(f"{name}_zero_point", np.array(0, dtype=np.int8))
            q = ir.node("QuantizeLinear", [value, scale, zero], name=f"{name}_QuantizeLinear")
            q.outputs[0].name = f"{name}_quantized"
            dq = ir.node("DequantizeLinear", [q.outputs[0], scale, zero], name=f"{name}_DequantizeLinear")
            dq.outputs[0].name = f"{name}_dequantized"
            self.graph.insert_before(node, [q, dq])
            self.dequantized[name] = dq.outputs[0]
            self.counts["QuantizeLinear"] += 1
            self.counts["DequantizeLinear"] += 1
        return self.dequantized[name]

    def _weight(self, node: ir.Node, value: ir.Value, axis: int) -> ir.Value:
        name = value.name or ""
        key = f"{name}@{axis}"
        if key not in self.dequantized:
            weight = value.const_value.numpy().astype(np.float32)  # type: ignore[union-attr]
            quantized, scales = quantize_per_channel(weight, axis)
            q = self._initializer(f"{name}_quantized", quantized)
            scale = self._initializer(f"{name}_scale", scales)
            zero = self._initializer(f"{name}_zero_point", np.zeros(scales.shape, dtype=np.int8))
            dq = ir.node(
                "DequantizeLinear",
                [q, scale, zero],
                attributes={"axis": axis},
                name=f"{name}_DequantizeLinear",
            )
            dq.outputs[0].name = f"{name}_dequantized"
            self.graph.insert_before(node, dq)
            self.dequantized[key] = dq.outputs[0]
            self.replaced_weights.add(name)
            self.counts["DequantizeLinear"] += 1
            self.counts["per_channel_weights"] += 1
        return self.dequantized[key]

    def _initializer(self, name: str, array: np.ndarray) -> ir.Value:
        value = ir.Value(name=name, const_value=ir.tensor(array, name=name))
        value.shape = ir.Shape(array.shape)
        value.dtype = ir.tensor(array).dtype
        self.graph.register_initializer(value)
        return value

    def drop_unused_initializers(self) -> None:
        for name in self.replaced_weights:
            value = self.graph.initializers.get(name)
            if value is not None and not value.uses() and not value.is_graph_output():
                del self.graph.initializers[name]


def quantize_per_channel(weight: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 per channel along `axis`: (int8 weight, positive float32 scales of shape [C])."""
    reduce_axes = tuple(a for a in range(weight.ndim) if a != axis)
    amax = np.max(np.abs(weight), axis=reduce_axes)
    scales = np.array([_scale(a) for a in amax], dtype=np.float32)
    shape = [1] * weight.ndim
    shape[axis] = -1
    quantized = np.clip(np.round(weight / scales.reshape(shape)), -INT8_MAX, INT8_MAX).astype(np.int8)
    return quantized, scales


def _scale(amax: float) -> float:
    """amax / 127, kept positive (TensorRT rejects zero scales): an all-zero tensor gets scale 1/127."""
    return float(amax) / INT8_MAX if amax > 0 else 1.0 / INT8_MAX
