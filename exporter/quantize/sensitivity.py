"""Automatic sensitive-layer exclusion: keep the layers that hurt accuracy most in high precision.

Each candidate layer is quantized alone and the output's mean token cosine vs fp32 is measured on a subset
of the calibration samples: 1 - cosine is that layer's contribution to the error. Then, starting from
"everything quantized", the worst layers are kept in high precision one by one until the cosine reaches the
search target, or the budget of excluded layers is spent. Quantizing layers one at a time ignores
interactions, so the greedy loop measures the real combined model after every step instead of trusting sums.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence

import numpy as np
import onnx
from onnx import numpy_helper

from exporter import progress

logger = logging.getLogger(__name__)

# evaluate(excluded node names) -> mean token cosine vs fp32 of the model quantized except those nodes
Evaluate = Callable[[frozenset[str]], float]


@dataclasses.dataclass
class SensitivityResult:
    excluded: list[str]
    cosine: float  # on the search samples, with `excluded` in high precision
    all_quantized_cosine: float
    layer_error: dict[str, float]  # node -> 1 - cosine when only that node is quantized
    trace: list[dict[str, object]]  # one entry per greedy step
    met: bool

    def to_json(self) -> dict[str, object]:
        worst = sorted(self.layer_error.items(), key=lambda kv: -kv[1])
        return {
            "excluded": self.excluded,
            "cosine": self.cosine,
            "all_quantized_cosine": self.all_quantized_cosine,
            "met": self.met,
            "layer_error_worst_first": [{"node": n, "error": e} for n, e in worst],
            "trace": self.trace,
        }


def search(
    candidates: Sequence[str],
    evaluate: Evaluate,
    target: float,
    max_excluded: int,
    sweep: Callable[[Sequence[str]], dict[str, float]] | None = None,
) -> SensitivityResult:
    """Greedy worst-first exclusion until `evaluate` reaches `target` or `max_excluded` layers are excluded.

    `sweep(candidates)` -> {node: cosine with only that node quantized} measures all layers at once (a
    switchable fake-quant graph); without it each layer is measured with `evaluate`."""
    everything = frozenset(candidates)
    all_quantized = evaluate(frozenset())
    trace: list[dict[str, object]] = [{"excluded": 0, "cosine": all_quantized}]
    if all_quantized >= target:
        return SensitivityResult([], all_quantized, all_quantized, {}, trace, met=True)
    alone = sweep(candidates) if sweep else {n: evaluate(everything - {n}) for n in candidates}
    layer_error = {name: 1.0 - alone[name] for name in candidates}
    order = sorted(candidates, key=lambda n: -layer_error[n])
    excluded: list[str] = []
    cosine = all_quantized
    for name in progress.bar(order[:max_excluded], desc="sensitivity: greedy", unit="layer"):
        excluded.append(name)
        cosine = evaluate(frozenset(excluded))
        trace.append({"excluded": len(excluded), "node": name, "cosine": cosine})
        logger.info("sensitivity: %d layers in high precision -> cosine %.5f", len(excluded), cosine)
        if cosine >= target:
            break
    return SensitivityResult(excluded, cosine, all_quantized, layer_error, trace, met=cosine >= target)


SWITCH_INPUT = "int8_layer_switch"


def switchable_model(
    proto: onnx.ModelProto, layers: dict[str, dict[str, int | None]], ranges: dict[str, float] | None
) -> onnx.ModelProto:
    """One fp32 graph in which every candidate layer can be fake-quantized or not at run time.

    `layers` maps node name -> {input name: per-channel axis for a weight, None for an activation}. Each such
    input becomes Where(switch[i], fakequant(x), x), with `switch` a bool graph input of one entry per layer,
    so the sweep runs one session N times instead of building N models. Activations are fake-quantized with
    the static symmetric `ranges` (the TensorRT scheme) or, when `ranges` is None, with
    DynamicQuantizeLinear (ONNX Runtime's dynamic u8 scheme, as its integer kernels compute).
    """
    model = onnx.ModelProto()
    model.CopyFrom(proto)
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    new_nodes: dict[str, list[onnx.NodeProto]] = {}  # node name -> nodes to insert before it
    fake: dict[str, str] = {}
    graph.input.append(onnx.helper.make_tensor_value_info(SWITCH_INPUT, onnx.TensorProto.BOOL, [len(layers)]))
    for index, (node_name, inputs) in enumerate(layers.items()):
        added = new_nodes.setdefault(node_name, [])
        switch = f"{SWITCH_INPUT}_{index}"
        graph.initializer.append(numpy_helper.from_array(np.array(index, np.int64), f"{switch}_index"))
        added.append(onnx.helper.make_node("Gather", [SWITCH_INPUT, f"{switch}_index"], [switch]))
        for name, axis in inputs.items():
            if name not in fake:
                fake[name], nodes = _fake_quant(graph, name, axis, inits, ranges)
                added.extend(nodes)
            added.append(
                onnx.helper.make_node("Where", [switch, fake[name], name], [f"{name}_switched_{index}"])
            )
    ordered = []
    for node in graph.node:
        if node.name in layers:
            ordered.extend(new_nodes[node.name])
            for pos, name in enumerate(node.input):
                if name in layers[node.name]:
                    node.input[pos] = f"{name}_switched_{list(layers).index(node.name)}"
        ordered.append(node)
    del graph.node[:]
    graph.node.extend(ordered)
    return model


def _fake_quant(graph, name, axis, inits, ranges):  # type: ignore[no-untyped-def]
    """(output name, nodes) computing the INT8 round trip of tensor `name`."""
    from graph_passes.insert_qdq import _scale, quantize_per_channel

    out = f"{name}_fakequant"
    if axis is not None:  # weight: int8 per channel, as stored in the quantized model
        quantized, scales = quantize_per_channel(numpy_helper.to_array(inits[name]).astype(np.float32), axis)
        graph.initializer.extend(
            [
                numpy_helper.from_array(quantized, f"{name}_fq_int8"),
                numpy_helper.from_array(scales, f"{name}_fq_scale"),
                numpy_helper.from_array(np.zeros(scales.shape, np.int8), f"{name}_fq_zero"),
            ]
        )
        node = onnx.helper.make_node(
            "DequantizeLinear", [f"{name}_fq_int8", f"{name}_fq_scale", f"{name}_fq_zero"], [out], axis=axis
        )
        return out, [node]
    if ranges is None:  # dynamic u8, per tensor, as ORT's DynamicQuantizeLinear
        q = onnx.helper.make_node(
            "DynamicQuantizeLinear", [name], [f"{name}_fq_u8", f"{name}_fq_s", f"{name}_fq_zp"]
        )
        dq = onnx.helper.make_node(
            "DequantizeLinear", [f"{name}_fq_u8", f"{name}_fq_s", f"{name}_fq_zp"], [out]
        )
        return out, [q, dq]
    graph.initializer.extend(
        [
            numpy_helper.from_array(np.array(_scale(ranges[name]), np.float32), f"{name}_fq_scale"),
            numpy_helper.from_array(np.array(0, np.int8), f"{name}_fq_zero"),
        ]
    )
    args = [f"{name}_fq_scale", f"{name}_fq_zero"]
    q = onnx.helper.make_node("QuantizeLinear", [name, *args], [f"{name}_fq_s8"])
    dq = onnx.helper.make_node("DequantizeLinear", [f"{name}_fq_s8", *args], [out])
    return out, [q, dq]
