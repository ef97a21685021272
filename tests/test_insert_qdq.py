"""Q/DQ placement by TensorRT's rules on a golden graph: exact counts, symmetric INT8, per-channel axes,
excluded and high-precision ops untouched, idempotence, and numerics vs a numpy fake-quant reference."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import numpy_helper
from quant_test_models import golden_block, golden_feeds

from graph_passes.base import GraphPassError
from graph_passes.insert_qdq import Exclusions, InsertQDQ, activation_tensors, plan, quantize_per_channel

ACTIVATIONS = ["ln0", "q", "kt", "probs", "v", "attn", "h2d", "img"]


def _ranges(model: onnx.ModelProto, names: list[str]) -> dict[str, float]:
    """amax per tensor = max |x| on the golden feeds (fp32 run with the tensors exposed as outputs)."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    for name in names:
        probe.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    values = _run(probe, golden_feeds(), names)
    return {n: float(np.abs(v).max()) for n, v in zip(names, values, strict=True)}


def _run(
    model: onnx.ModelProto, feeds: dict[str, np.ndarray], outputs: list[str] | None = None
) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(outputs, feeds)


def _quantized(exclusions: Exclusions | None = None) -> tuple[onnx.ModelProto, object]:
    model = golden_block()
    ranges = _ranges(model, ACTIVATIONS)
    ir_model = ir.from_proto(model)
    result = InsertQDQ(ranges, exclusions or Exclusions())(ir_model)
    return ir.to_proto(ir_model), result


def test_plan_names_the_tensors_to_calibrate() -> None:
    decisions = plan(ir.from_proto(golden_block()))
    assert activation_tensors(decisions) == ACTIVATIONS
    rules = {d.node: (d.quantized, d.rule) for d in decisions}
    assert rules["mask_add"][0] is False and "mask" in rules["mask_add"][1]
    assert rules["residual_add"][0] is False and "LayerNormalization" in rules["residual_add"][1]
    assert rules["conv_residual_add"][0] is True and "skip input" in rules["conv_residual_add"][1]


def test_golden_counts_symmetric_and_per_channel_axes() -> None:
    model, result = _quantized()
    ops = Counter(n.op_type for n in model.graph.node)
    assert ops["QuantizeLinear"] == 8  # one per activation tensor, shared by its consumers
    assert ops["DequantizeLinear"] == 8 + 6  # + one per weight (Wq, Wk, Wv, Wo, Wg, Wc)
    assert result.report.counts["per_channel_weights"] == 6
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            zero_point, scale = inits[node.input[2]], inits[node.input[1]]
            assert zero_point.dtype == np.int8 and not zero_point.any(), node.name
            assert (scale > 0).all(), node.name
    axes = {
        n.input[0]: {a.name: a.i for a in n.attribute}.get("axis")
        for n in model.graph.node
        if n.op_type == "DequantizeLinear"
    }
    assert axes["Wq_quantized"] == 1 and axes["Wo_quantized"] == 1  # MatMul [K, N]: output channel N
    assert axes["Wg_quantized"] == 0  # Gemm transB=1: [N, K]
    assert axes["Wc_quantized"] == 0  # Conv [O, I, kh, kw]
    assert inits["Wc_scale"].shape == (4,) and inits["Wg_scale"].shape == (5,)
    assert "Wq" not in inits  # the fp32 weight is replaced by its int8 copy
    # Q/DQ on inputs, not outputs: exactly the planned input tensors are quantized (not o, g, conv...),
    # and every DequantizeLinear feeds a compute op (or the conv residual Add)
    assert sorted(n.input[0] for n in model.graph.node if n.op_type == "QuantizeLinear") == sorted(
        ACTIVATIONS
    )
    dq_outputs = {n.output[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    fed = {n.op_type for n in model.graph.node if set(n.input) & dq_outputs}
    assert fed == {"MatMul", "Gemm", "Conv", "Add"}


def test_high_precision_ops_untouched() -> None:
    model, _ = _quantized()
    consumers = {n.name: list(n.input) for n in model.graph.node}
    assert consumers["ln0"][0] == "x" and consumers["ln1"][0] == "res"
    assert consumers["softmax"] == ["masked"] and consumers["mask_add"] == ["scores", "mask"]
    assert consumers["residual_add"] == ["o", "x"]


def test_exclusions_by_name_op_type_and_regex() -> None:
    exclusions = Exclusions.of(names=["o_proj"], op_types=["Conv"], regex=[r"^(qk|pv)$"])
    model, result = _quantized(exclusions)
    nodes = {n.name: n for n in model.graph.node}
    assert list(nodes["o_proj"].input) == ["attn", "Wo"]
    assert list(nodes["conv"].input) == ["img", "Wc"]
    assert list(nodes["qk"].input) == ["q", "kt"] and list(nodes["pv"].input) == ["probs", "v"]
    rules = {d["node"]: d["rule"] for d in result.report.details if "node" in d}
    assert rules["o_proj"] == "excluded by name"
    assert rules["conv"] == "excluded by op type Conv"
    assert rules["qk"].startswith("excluded by regex")
    assert not nodes["conv_residual_add"].input[1].endswith("_dequantized")  # conv excluded: no skip Q/DQ


def test_second_run_changes_nothing() -> None:
    model, _ = _quantized()
    ir_model = ir.from_proto(model)
    again = InsertQDQ(_ranges(golden_block(), ACTIVATIONS))(ir_model)
    assert not again.modified
    assert Counter(n.op_type for n in ir.to_proto(ir_model).graph.node) == Counter(
        n.op_type for n in model.graph.node
    )


def test_missing_range_is_an_error_naming_the_pass() -> None:
    with pytest.raises(GraphPassError, match="insert-qdq: no calibrated range"):
        InsertQDQ({"ln0": 1.0})(ir.from_proto(golden_block()))


def test_matmul_equals_numpy_fake_quant() -> None:
    model, _ = _quantized()
    feeds = golden_feeds()
    ranges = _ranges(golden_block(), ACTIVATIONS)
    ln0, q = _run(golden_block_with_outputs(model), feeds, ["ln0", "q"])
    weight = numpy_helper.to_array(next(i for i in golden_block().graph.initializer if i.name == "Wq"))
    w_int8, w_scale = quantize_per_channel(weight, axis=1)
    x_scale = np.float32(ranges["ln0"] / 127)
    x_fq = np.clip(np.round(ln0 / x_scale), -127, 127) * x_scale
    expected = x_fq @ (w_int8.astype(np.float32) * w_scale)
    err = np.abs(q - expected)
    assert err.max() < 1e-4, f"max abs error {err.max():.3g} at {np.unravel_index(err.argmax(), err.shape)}"
    fp32 = _run(golden_block_with_outputs(golden_block()), feeds, ["q"])[0]
    assert np.abs(q - fp32).max() > 1e-5  # the test would notice if no quantization happened


def golden_block_with_outputs(model: onnx.ModelProto) -> onnx.ModelProto:
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    for name in ("ln0", "q"):
        probe.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    return probe


def test_quantized_block_stays_close_to_fp32() -> None:
    model, _ = _quantized()
    feeds = golden_feeds()
    for ref, out in zip(_run(golden_block(), feeds), _run(model, feeds), strict=True):
        cos = (ref * out).sum() / (np.linalg.norm(ref) * np.linalg.norm(out))
        assert cos > 0.995, cos


def test_per_channel_weight_quantization_matches_reference() -> None:
    weight = np.random.default_rng(0).normal(0, 1, (6, 3)).astype(np.float32)
    weight[:, 2] = 0.0
    q, scales = quantize_per_channel(weight, axis=1)
    assert np.allclose(scales[:2], np.abs(weight[:, :2]).max(axis=0) / 127)
    assert scales[2] > 0 and not q[:, 2].any()
    assert np.abs(q.astype(np.float32) * scales - weight).max() <= scales.max() / 2 + 1e-7
