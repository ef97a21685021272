"""A Q/DQ model as the accuracy checks run it: its weights' DequantizeLinear computed once, exactly.

The INT8 checks run a Q/DQ file with ONNX Runtime's optimizations off, so that every QuantizeLinear /
DequantizeLinear executes as written (fake quantization: what TensorRT computes, in float). A weight's
DequantizeLinear then runs on every call: on the 45M Llama's TensorRT file 22% of a held-out run's kernel
time (ONNX Runtime's profiler, 8 x 128 tokens), and ORT's own constant folding never folds it (it keeps
DequantizeLinear for its QDQ fusions). `fold_weight_dequantize` computes those nodes once with the kernel's own arithmetic,
float32((int32(x) - int32(zero_point))) * scale, so the folded model's outputs are the same bits (tests:
tests/test_fake_quant.py) and each check run does only the activations' Q/DQ and the float math.
Each folded weight is read through an Identity node: its consumer sees a computed tensor, as it saw the
DequantizeLinear's output, so ONNX Runtime does not prepack it as a constant MatMul weight (a prepacked
weight takes another GEMM path whose sums differ in the last bits: on the Llama's file, logits up to 0.07
apart once the next activation's rounding amplifies them), while the model's fp32 weights (excluded layers)
are prepacked as in the file's own run. `tools/bench_fake_quant.py` (as written vs folded, same bits): the
Llama's TensorRT file at 8 x 128 tokens 0.439 -> 0.395 s per run, the demo's at 8 x 64 0.057 -> 0.054 s.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

FOLDED = (onnx.TensorProto.INT8, onnx.TensorProto.UINT8)


def fold_weight_dequantize(model: onnx.ModelProto) -> onnx.ModelProto:
    """A new model (`model` untouched): every DequantizeLinear of the main graph whose inputs are all
    initializers (int8/uint8 per tensor or per axis, float32 scale, no block size) replaced by an Identity
    of its float32 output, an initializer `<output>_folded`; initializers only those nodes read are dropped.
    Anything else stays as is. The new model holds the graph, ir_version, opsets and functions, as
    `onnx.helper.make_model(onnx.helper.make_graph(...))` builds them, but each folded tensor is written into
    it once (building it apart and copying it in twice took 0.6 of 1.0 s on the 45M Llama's Q/DQ file)."""
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    folded: dict[str, np.ndarray] = {}
    kept_nodes = []
    for node in graph.node:
        value = _folded(node, inits)
        if value is None:
            kept_nodes.append(node)
        else:
            constant = f"{node.output[0]}_folded"
            folded[constant] = value
            # read through an Identity: the consumer sees a computed tensor, as it saw the DequantizeLinear's
            kept_nodes.append(onnx.helper.make_node("Identity", [constant], [node.output[0]], name=node.name))
    if not folded:
        return model
    read = {name for node in kept_nodes for name in node.input} | {o.name for o in graph.output}
    with_subgraphs = any(a.HasField("g") or a.graphs for node in kept_nodes for a in node.attribute)
    new = onnx.ModelProto()
    new.ir_version = model.ir_version
    new_graph = new.graph
    new_graph.node.extend(kept_nodes)
    new_graph.name = graph.name
    new_graph.input.extend(graph.input)
    new_graph.output.extend(graph.output)
    new_graph.initializer.extend(i for i in graph.initializer if i.name in read or with_subgraphs)
    for name, value in folded.items():
        tensor = new_graph.initializer.add()
        tensor.dims.extend(value.shape)
        tensor.data_type = onnx.TensorProto.FLOAT
        tensor.raw_data = value.tobytes()
        tensor.name = name
    new_graph.value_info.extend(graph.value_info)
    new.opset_import.extend(model.opset_import)
    new.functions.extend(model.functions)
    return new


def _folded(node: onnx.NodeProto, inits: dict[str, onnx.TensorProto]) -> np.ndarray | None:
    """The node's output when it is a foldable weight DequantizeLinear, else None."""
    if node.op_type != "DequantizeLinear" or node.domain not in ("", "ai.onnx"):
        return None
    names = [n for n in node.input if n]
    if not names or any(n not in inits for n in names):
        return None
    attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    if attributes.get("block_size", 0):
        return None
    x, scale = inits[names[0]], inits[names[1]]
    if x.data_type not in FOLDED or scale.data_type != onnx.TensorProto.FLOAT:
        return None
    # int8/uint8 values and zero points are exact in float32, and so is their difference (|x - z| <= 255):
    # float32(x) - float32(z) is the kernel's float32(int32(x) - int32(z)), computed in place
    values = numpy_helper.to_array(x).astype(np.float32)
    scales = numpy_helper.to_array(scale)
    zero = numpy_helper.to_array(inits[names[2]]).astype(np.float32) if len(names) > 2 else np.float32(0)
    if scales.ndim == 1 and scales.size > 1:  # per axis: scale and zero point along `axis`
        axis = int(attributes.get("axis", 1)) % values.ndim
        shape = [1] * values.ndim
        shape[axis] = scales.size
        scales = scales.reshape(shape)
        zero = zero.reshape(shape) if np.ndim(zero) else zero
    elif scales.size == 1:
        scales = scales.reshape(())
        zero = zero.reshape(()) if np.ndim(zero) else zero
    else:
        return None
    if np.any(zero):
        values -= zero
    values *= scales
    return values
