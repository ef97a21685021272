"""graph_passes.convert_fp16: where the Casts go, that it is idempotent, and fp16 vs fp32 numerics on ORT.

Numerics run on ONNX Runtime CPU with its graph optimizations off. ORT's CPU kernels compute
several fp16 ops in fp32 behind casts of their own, so this checks the graph's fp16 storage and
rounding (weights, activations, clamped constants), not TensorRT's fp16 kernels.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from engines.onnxruntime_runner import OnnxRuntimeRunner
from exporter.validate.tolerances import tolerance
from graph_passes.convert_fp16 import FP16_MAX, ConvertFp16Pass, to_fp16

HIDDEN = 16


def _attention_block(seed: int = 0) -> onnx.ModelProto:
    """x -> MatMul+Add -> LayerNorm -> self-attention scores + mask*finfo.min -> Softmax -> MatMul."""
    rng = np.random.default_rng(seed)
    inits = [
        numpy_helper.from_array(rng.normal(0, 0.3, (HIDDEN, HIDDEN)).astype(np.float32), "w"),
        numpy_helper.from_array(rng.normal(0, 0.1, (HIDDEN,)).astype(np.float32), "b"),
        numpy_helper.from_array((1 + rng.normal(0, 0.1, (HIDDEN,))).astype(np.float32), "gamma"),
        numpy_helper.from_array(rng.normal(0, 0.1, (HIDDEN,)).astype(np.float32), "beta"),
        numpy_helper.from_array(np.array(1.0, np.float32), "one"),
    ]
    big_negative = numpy_helper.from_array(np.array(np.finfo(np.float32).min, np.float32))
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["xw"], name="proj"),
        helper.make_node("Add", ["xw", "b"], ["h"], name="proj_bias"),
        helper.make_node(
            "LayerNormalization", ["h", "gamma", "beta"], ["ln"], name="ln", axis=-1, epsilon=1e-5
        ),
        helper.make_node("Transpose", ["ln"], ["ln_t"], name="t", perm=[0, 2, 1]),
        helper.make_node("MatMul", ["ln", "ln_t"], ["scores"], name="qk"),
        helper.make_node("Unsqueeze", ["mask", "axes1"], ["mask3"], name="unsq"),
        helper.make_node(
            "Constant", [], ["axes1"], name="axes_c", value=numpy_helper.from_array(np.array([1]))
        ),
        helper.make_node("Sub", ["one", "mask3"], ["inv"], name="inv"),
        helper.make_node("Constant", [], ["neg"], name="neg_c", value=big_negative),
        helper.make_node("Mul", ["inv", "neg"], ["bias"], name="mask_bias"),
        helper.make_node("Add", ["scores", "bias"], ["masked"], name="add_mask"),
        helper.make_node("Softmax", ["masked"], ["probs"], name="softmax", axis=-1),
        helper.make_node("MatMul", ["probs", "ln"], ["y"], name="pv"),
    ]
    nodes.insert(5, nodes.pop(6))  # the axes Constant before its Unsqueeze
    graph = helper.make_graph(
        nodes,
        "attention_block",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "sequence", HIDDEN]),
            helper.make_tensor_value_info("mask", TensorProto.FLOAT, ["batch", "sequence"]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "sequence", HIDDEN])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _feeds(seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    mask = np.ones((2, 6), np.float32)
    mask[1, 4:] = 0
    return {"x": rng.normal(0, 1, (2, 6, HIDDEN)).astype(np.float32), "mask": mask}


def _convert(model: onnx.ModelProto, **kwargs: object) -> tuple[onnx.ModelProto, object]:
    ir_model = ir.from_proto(model)
    result = ConvertFp16Pass(**kwargs)(ir_model)  # type: ignore[arg-type]
    return ir.to_proto(ir_model), result


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray], tmp_path, name: str) -> dict[str, np.ndarray]:  # type: ignore[no-untyped-def]
    path = tmp_path / f"{name}.onnx"
    onnx.save(model, path)
    with OnnxRuntimeRunner(path, optimization_level="disable") as runner:
        return runner.infer(feeds)


def _dtype_of(model: onnx.ModelProto) -> dict[str, int]:
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    types = {v.name: v.type.tensor_type.elem_type for v in inferred.graph.value_info}
    types.update({v.name: v.type.tensor_type.elem_type for v in inferred.graph.input})
    types.update({v.name: v.type.tensor_type.elem_type for v in inferred.graph.output})
    types.update({i.name: i.data_type for i in inferred.graph.initializer})
    return types


def _assert_close(reference: np.ndarray, got: np.ndarray, what: str) -> None:
    tol = tolerance("fp16")
    assert np.all(np.isfinite(got)), f"{what}: non-finite values at {np.argwhere(~np.isfinite(got))[:5]}"
    err = np.abs(reference.astype(np.float64) - got.astype(np.float64))
    where = np.unravel_index(np.argmax(err), err.shape)
    ref_rows, got_rows = reference.reshape(-1, reference.shape[-1]), got.reshape(-1, got.shape[-1])
    cosine = np.sum(ref_rows * got_rows, -1) / (
        np.linalg.norm(ref_rows, axis=-1) * np.linalg.norm(got_rows, axis=-1) + 1e-12
    )
    assert err.max() <= tol.max_abs, f"{what}: max abs error {err.max():.3g} at {where}"
    assert cosine.mean() >= tol.min_mean_cosine, f"{what}: mean cosine {cosine.mean():.6f}"


def test_layernorm_and_softmax_inputs_stay_fp32_and_the_rest_is_fp16() -> None:
    converted, result = _convert(_attention_block())
    onnx.checker.check_model(converted, full_check=True)
    types = _dtype_of(converted)
    nodes = {n.name: n for n in converted.graph.node}
    for name in ("ln", "softmax"):
        assert {types[v] for v in nodes[name].input} == {TensorProto.FLOAT}, name
        assert types[nodes[name].output[0]] == TensorProto.FLOAT, name
    for name in ("proj", "qk", "pv", "add_mask", "mask_bias"):
        assert {types[v] for v in nodes[name].input} == {TensorProto.FLOAT16}, name
    assert types["gamma"] == types["beta"] == TensorProto.FLOAT  # LayerNorm weights stay fp32
    assert types["w"] == TensorProto.FLOAT16
    assert [types[i.name] for i in converted.graph.input] == [TensorProto.FLOAT] * 2  # feeds unchanged
    assert types["y"] == TensorProto.FLOAT and converted.graph.output[0].name == "y"
    counts = result.report.counts  # type: ignore[attr-defined]
    # x and mask in; LN in/out; Softmax in/out; y out
    assert counts["casts_inserted"] == 7, counts
    assert counts["initializers_to_fp16"] == 3 and counts["constants_to_fp16"] == 1, counts


def test_second_run_changes_nothing() -> None:
    once, _ = _convert(_attention_block())
    twice, result = _convert(once)
    assert result.report.counts == {} and not result.modified  # type: ignore[attr-defined]
    assert [n.op_type for n in twice.graph.node] == [n.op_type for n in once.graph.node]


def test_fp16_graph_matches_fp32_on_onnxruntime(tmp_path) -> None:  # type: ignore[no-untyped-def]
    model = _attention_block()
    converted, _ = _convert(model)
    feeds = _feeds()
    reference = _run(model, feeds, tmp_path, "fp32")["y"]
    got = _run(converted, feeds, tmp_path, "fp16")["y"]
    assert got.dtype == np.float32
    _assert_close(reference, got, "attention block fp16 vs fp32")


def test_mask_constant_is_clamped_not_infinite(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """finfo(float32).min as fp16 is -inf, and (1 - 1) * -inf is NaN: the pass clamps to -65504."""
    array, changed = to_fp16(np.array([np.finfo(np.float32).min, 1e-30, 0.5], np.float32))
    assert array.tolist() == [-FP16_MAX, pytest.approx(2.0**-24), 0.5] and changed == 2
    with np.errstate(over="ignore"):  # what the clamp prevents
        assert np.isneginf(np.float32(np.finfo(np.float32).min).astype(np.float16))


def test_keeping_nothing_fp32_puts_softmax_in_fp16() -> None:
    """The placement is the pass's choice, not an accident: with no kept ops there are no inner Casts."""
    converted, result = _convert(_attention_block(), keep_fp32_ops=())
    types = _dtype_of(converted)
    softmax = next(n for n in converted.graph.node if n.op_type == "Softmax")
    assert types[softmax.input[0]] == TensorProto.FLOAT16
    assert result.report.counts["casts_inserted"] == 3  # type: ignore[attr-defined]  # x, mask in; y out


def test_exported_bert_fp16_matches_fp32(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from tests.graph_models import bert_example, bert_onnx

    model = bert_onnx()
    converted, _ = _convert(model)
    onnx.checker.check_model(converted)
    types = _dtype_of(converted)
    for node in converted.graph.node:
        if node.op_type in ("LayerNormalization", "Softmax"):
            assert types[node.input[0]] == TensorProto.FLOAT, node.name
        if node.op_type == "MatMul":
            assert types[node.input[0]] == TensorProto.FLOAT16, node.name
    feeds = bert_example()
    reference = _run(model, feeds, tmp_path, "bert32")
    got = _run(converted, feeds, tmp_path, "bert16")
    for name, ref in reference.items():
        _assert_close(ref, got[name], f"tiny BERT {name}")
