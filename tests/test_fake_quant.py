"""exporter/quantize/fake_quant.py: a Q/DQ model with its weights' DequantizeLinear folded gives the same bits
on ONNX Runtime (optimizations off, as the INT8 checks run it), and only those nodes are folded."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from exporter.quantize.fake_quant import fold_weight_dequantize


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> np.ndarray:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.add_session_config_entry(
        "session.disable_prepacking", "1"
    )  # as exporter/quantize/int8.py runs it
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0]


def _qdq_model(rng: np.random.Generator) -> onnx.ModelProto:
    """x -> MatMul with an int8 per-axis weight -> Q/DQ (activation) -> MatMul with a uint8 per-tensor weight
    (zero point 3) -> Add with an int8 per-axis (axis 0) row -> MatMul with an fp32 weight; awkward scales so
    rounding shows."""
    # [512, 512]: large enough that ONNX Runtime would prepack it as a constant weight, a GEMM path whose sums
    # differ in the last bits (the fold's Identity keeps it a computed tensor, as in the file)
    w1 = rng.integers(-127, 128, (512, 512)).astype(np.int8)
    s1 = (rng.random(512) * 0.0037 + 1e-4).astype(np.float32)
    w2 = rng.integers(0, 256, (512, 4)).astype(np.uint8)
    w3 = rng.integers(-127, 128, (4, 1)).astype(np.int8)
    s3 = (rng.random(4) * 0.3 + 1e-2).astype(np.float32)
    inits = [
        numpy_helper.from_array(np.array(0.0173, np.float32), "act_scale"),
        numpy_helper.from_array(np.array(0, np.int8), "act_zero"),
        numpy_helper.from_array(w1, "w1"),
        numpy_helper.from_array(s1, "s1"),
        numpy_helper.from_array(np.zeros(512, np.int8), "z1"),
        numpy_helper.from_array(w2, "w2"),
        numpy_helper.from_array(np.array(0.0291, np.float32), "s2"),
        numpy_helper.from_array(np.array(3, np.uint8), "z2"),
        numpy_helper.from_array(w3, "w3"),
        numpy_helper.from_array(s3, "s3"),
    ]
    nodes = [
        helper.make_node("DequantizeLinear", ["w1", "s1", "z1"], ["w1_dq"], axis=1),
        helper.make_node("MatMul", ["x", "w1_dq"], ["h"]),
        helper.make_node("QuantizeLinear", ["h", "act_scale", "act_zero"], ["x_q"]),
        helper.make_node("DequantizeLinear", ["x_q", "act_scale", "act_zero"], ["h_dq"]),
        helper.make_node("DequantizeLinear", ["w2", "s2", "z2"], ["w2_dq"]),
        helper.make_node("MatMul", ["h_dq", "w2_dq"], ["y0"]),
        helper.make_node("DequantizeLinear", ["w3", "s3"], ["w3_dq"], axis=0),
        helper.make_node("Reshape", ["w3_dq", "shape"], ["row"]),
        helper.make_node("Add", ["y0", "row"], ["y1"]),
        helper.make_node("MatMul", ["y1", "w4"], ["y"]),  # an fp32 weight (an excluded layer): prepacked
    ]
    inits.append(numpy_helper.from_array(rng.standard_normal((4, 4)).astype(np.float32), "w4"))
    inits.append(numpy_helper.from_array(np.array([1, 4], np.int64), "shape"))
    graph = helper.make_graph(
        nodes,
        "qdq",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [64, 512])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [64, 4])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_folded_weights_give_the_same_bits_and_only_weights_fold():
    rng = np.random.default_rng(0)
    model = _qdq_model(rng)
    before = model.SerializeToString()
    folded = fold_weight_dequantize(model)
    assert model.SerializeToString() == before  # the input model is untouched
    kept = [n for n in folded.graph.node if n.op_type == "DequantizeLinear"]
    assert [n.input[0] for n in kept] == ["x_q"]  # the activation's round trip stays
    names = {i.name for i in folded.graph.initializer}
    assert {"w1_dq_folded", "w2_dq_folded", "w3_dq_folded", "w4"} <= names
    assert not {"w1", "w2", "w3", "s1", "z2"} & names
    for seed in range(5):
        x = np.random.default_rng(seed).standard_normal((64, 512)).astype(np.float32) * 3
        expected, got = _run(model, {"x": x}), _run(folded, {"x": x})
        assert expected.tobytes() == got.tobytes()


def test_a_model_without_foldable_nodes_is_returned_as_is():
    rng = np.random.default_rng(1)
    model = _qdq_model(rng)
    for node in model.graph.node:  # weights fed by a graph input: nothing is constant
        if node.op_type == "DequantizeLinear" and node.input[0] != "x_q":
            node.input[0] = "x_q"
    assert fold_weight_dequantize(model) is model


def test_the_folded_model_is_the_one_onnx_helpers_build():
    """fold_weight_dequantize writes each folded tensor straight into the new model: the same bytes as the
    model `onnx.helper.make_model(make_graph(...))` builds from the same nodes and initializers, with the
    kernel's arithmetic (int32 difference, float32 product) for the folded values."""
    model = _qdq_model(np.random.default_rng(4))
    graph = model.graph
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    nodes, folded = [], []
    for node in graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] in inits:
            x, scale = inits[node.input[0]].astype(np.int32), inits[node.input[1]]
            zero = inits[node.input[2]].astype(np.int32) if len(node.input) > 2 else np.int32(0)
            axis = next((a.i for a in node.attribute if a.name == "axis"), 1) % x.ndim
            shape = [1] * x.ndim
            if scale.size > 1:
                shape[axis] = scale.size
            value = (x - np.reshape(zero, shape if np.size(zero) > 1 else ())).astype(np.float32)
            value = (value * scale.reshape(shape if scale.size > 1 else ())).astype(np.float32)
            folded.append(numpy_helper.from_array(value, f"{node.output[0]}_folded"))
            nodes.append(helper.make_node("Identity", [folded[-1].name], [node.output[0]], name=node.name))
        else:
            nodes.append(node)
    read = {name for node in nodes for name in node.input} | {o.name for o in graph.output}
    expected = helper.make_model(
        helper.make_graph(
            nodes,
            graph.name,
            list(graph.input),
            list(graph.output),
            [i for i in graph.initializer if i.name in read] + folded,
            value_info=list(graph.value_info),
        ),
        ir_version=model.ir_version,
        opset_imports=model.opset_import,
        functions=model.functions,
    )
    assert fold_weight_dequantize(model).SerializeToString() == expected.SerializeToString()
