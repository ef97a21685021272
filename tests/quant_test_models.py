"""Seeded ONNX graphs for the INT8 tests, written in code (onnx.helper), small enough to run in milliseconds."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

DIM = 16


def _init(name: str, array: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(array), name)


def _model(nodes, inputs, outputs, inits) -> onnx.ModelProto:  # type: ignore[no-untyped-def]
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def mlp_with_outlier(
    layers: int = 4, outlier_layer: int = 2, outlier: float = 1000.0, seed: int = 0
) -> onnx.ModelProto:
    """x[b, s, DIM] -> layers x (MatMul, Add bias, Relu) -> y. The input of `outlier_layer` has one channel scaled
    by `outlier` (the weight row below it scaled by 1/outlier, so fp32 is unchanged): per-tensor INT8 of that
    input wipes out every other channel, as real LLM/BERT outlier channels do."""
    rng = np.random.default_rng(seed)
    nodes, inits, current = [], [], "x"
    for i in range(layers):
        weight = rng.normal(0, 1 / np.sqrt(DIM), (DIM, DIM)).astype(np.float32)
        if i == outlier_layer:
            scale = np.ones(DIM, dtype=np.float32)
            scale[0] = outlier
            weight[0] /= outlier
            inits.append(_init(f"outlier_scale_{i}", scale))
            nodes.append(
                helper.make_node("Mul", [current, f"outlier_scale_{i}"], [f"scaled_{i}"], name=f"scale_{i}")
            )
            current = f"scaled_{i}"
        inits += [_init(f"w{i}", weight), _init(f"b{i}", rng.normal(0, 0.1, DIM).astype(np.float32))]
        nodes += [
            helper.make_node("MatMul", [current, f"w{i}"], [f"mm{i}"], name=f"layer{i}/MatMul"),
            helper.make_node("Add", [f"mm{i}", f"b{i}"], [f"add{i}"], name=f"layer{i}/Add"),
            helper.make_node(
                "Relu", [f"add{i}"], [f"h{i}" if i < layers - 1 else "y"], name=f"layer{i}/Relu"
            ),
        ]
        current = f"h{i}"
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", DIM])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", DIM])
    return _model(nodes, [x], [y], inits)


def golden_block(seed: int = 0) -> onnx.ModelProto:
    """One transformer-ish block plus a conv residual, covering every placement rule:
    x[b, 8, DIM], mask[b, 8, 8], img[b, 4, 6, 6] ->
      q = LN(x) @ Wq; k = LN(x) @ Wk; v = Gemm-free MatMul(LN(x), Wv)
      p = Softmax(q @ kᵀ + mask); a = p @ v; h = LN(a @ Wo + x)         (residual Add -> LayerNorm)
      g = Gemm(Reshape(h), Wg, transB=1)                                   (Gemm per-channel axis 0)
      c = Relu(Conv(img) + img)                                            (Conv residual Add)
    """
    rng = np.random.default_rng(seed)
    w = lambda *s: rng.normal(0, 0.3, s).astype(np.float32)  # noqa: E731
    inits = [
        _init("ln_scale", np.ones(DIM, np.float32)),
        _init("ln_bias", np.zeros(DIM, np.float32)),
        _init("Wq", w(DIM, DIM)),
        _init("Wk", w(DIM, DIM)),
        _init("Wv", w(DIM, DIM)),
        _init("Wo", w(DIM, DIM)),
        _init("Wg", w(5, DIM)),
        _init("Wc", w(4, 4, 3, 3)),
        _init("flat", np.array([-1, DIM], np.int64)),
    ]
    n = helper.make_node
    nodes = [
        n("LayerNormalization", ["x", "ln_scale", "ln_bias"], ["ln0"], name="ln0", axis=-1),
        n("MatMul", ["ln0", "Wq"], ["q"], name="q_proj"),
        n("MatMul", ["ln0", "Wk"], ["k"], name="k_proj"),
        n("MatMul", ["ln0", "Wv"], ["v"], name="v_proj"),
        n("Transpose", ["k"], ["kt"], name="k_t", perm=[0, 2, 1]),
        n("MatMul", ["q", "kt"], ["scores"], name="qk"),
        n("Add", ["scores", "mask"], ["masked"], name="mask_add"),
        n("Softmax", ["masked"], ["probs"], name="softmax", axis=-1),
        n("MatMul", ["probs", "v"], ["attn"], name="pv"),
        n("MatMul", ["attn", "Wo"], ["o"], name="o_proj"),
        n("Add", ["o", "x"], ["res"], name="residual_add"),
        n("LayerNormalization", ["res", "ln_scale", "ln_bias"], ["h"], name="ln1", axis=-1),
        n("Reshape", ["h", "flat"], ["h2d"], name="flatten"),
        n("Gemm", ["h2d", "Wg"], ["g"], name="gemm", transB=1),
        n("Conv", ["img", "Wc"], ["conv"], name="conv", pads=[1, 1, 1, 1]),
        n("Add", ["conv", "img"], ["conv_res"], name="conv_residual_add"),
        n("Relu", ["conv_res"], ["c"], name="relu"),
    ]
    inputs = [
        helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 8, DIM]),
        helper.make_tensor_value_info("mask", TensorProto.FLOAT, ["b", 8, 8]),
        helper.make_tensor_value_info("img", TensorProto.FLOAT, ["b", 4, 6, 6]),
    ]
    outputs = [
        helper.make_tensor_value_info("g", TensorProto.FLOAT, ["n", 5]),
        helper.make_tensor_value_info("c", TensorProto.FLOAT, ["b", 4, 6, 6]),
    ]
    return _model(nodes, inputs, outputs, inits)


def golden_feeds(batch: int = 4, seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    mask = np.zeros((batch, 8, 8), np.float32)
    mask[:, :, 6:] = -1e4
    return {
        "x": rng.normal(0, 1, (batch, 8, DIM)).astype(np.float32),
        "mask": mask,
        "img": rng.normal(0, 1, (batch, 4, 6, 6)).astype(np.float32),
    }
