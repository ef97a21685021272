"""TensorRT on a GPU: engines built from the tiny BERT (FP16 in the graph) and a Q/DQ graph, checked
against ONNX Runtime on the same ONNX; timing cache reuse; metadata; refusal of foreign engines;
2:4 sparsity report. Marked `gpu`: they skip here (no TensorRT, no GPU) with the reason, and have
not yet run on a GPU from this repository's machines."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from engines.onnxruntime_runner import OnnxRuntimeRunner
from engines.selection import tensorrt_skip_reason
from export_errors import InputError
from exporter.validate.tolerances import tolerance

TRT_SKIP = tensorrt_skip_reason()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(TRT_SKIP is not None, reason=f"TensorRT: {TRT_SKIP}")]


def _mean_cosine(a: np.ndarray, b: np.ndarray) -> float:
    a2, b2 = a.reshape(-1, a.shape[-1]).astype(np.float64), b.reshape(-1, b.shape[-1]).astype(np.float64)
    return float(
        np.mean(np.sum(a2 * b2, -1) / (np.linalg.norm(a2, axis=-1) * np.linalg.norm(b2, axis=-1) + 1e-12))
    )


def _ort(path, feeds):  # type: ignore[no-untyped-def]
    with OnnxRuntimeRunner(path, optimization_level="disable") as runner:
        return runner.infer(feeds)


def _qdq_matmul(k: int = 256, n: int = 256, sparse: bool = False) -> onnx.ModelProto:
    """x -> Q/DQ (symmetric int8) -> MatMul with DQ(int8 weights) -> y; optionally 2:4-sparse, tagged."""
    from engines.tensorrt.builder import SPARSITY_NODE_KEY, SPARSITY_NODE_VALUE

    rng = np.random.default_rng(0)
    weight = rng.integers(-127, 128, size=(k, n)).astype(np.int8)
    if sparse:  # keep 2 of every 4 along K
        weight.reshape(k // 4, 4, n)[:, 2:, :] = 0
    inits = [
        numpy_helper.from_array(weight, "w_q"),
        numpy_helper.from_array(np.array(0.002, np.float32), "w_scale"),
        numpy_helper.from_array(np.array(0, np.int8), "zero"),
        numpy_helper.from_array(np.array(0.03, np.float32), "x_scale"),
    ]
    matmul = helper.make_node("MatMul", ["x_dq", "w_dq"], ["y"], name="fc")
    if sparse:
        entry = matmul.metadata_props.add()
        entry.key, entry.value = SPARSITY_NODE_KEY, SPARSITY_NODE_VALUE
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "x_scale", "zero"], ["x_q"], name="q_x"),
        helper.make_node("DequantizeLinear", ["x_q", "x_scale", "zero"], ["x_dq"], name="dq_x"),
        helper.make_node("DequantizeLinear", ["w_q", "w_scale", "zero"], ["w_dq"], name="dq_w"),
        matmul,
    ]
    graph = helper.make_graph(
        nodes,
        "qdq_matmul",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "sequence", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "sequence", n])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_tiny_bert_fp16_engine_matches_onnxruntime(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from engines.onnx_inputs import onnx_input_specs
    from engines.tensorrt.builder import TensorRTBuildConfig, build_engine, default_profiles
    from engines.tensorrt.runner import TensorRTRunner
    from tests.graph_models import bert_example, bert_onnx

    onnx_path = tmp_path / "model.onnx"
    onnx.save(bert_onnx(), onnx_path)
    # max sequence within the tiny config's 64 position embeddings (a longer max fails the build)
    profile = default_profiles(onnx_input_specs(onnx.load(str(onnx_path))), max_batch=4, max_seq=16)
    config = TensorRTBuildConfig(profiles=(profile,), timing_cache=tmp_path / "cache")
    result = build_engine(onnx_path, tmp_path / "model.plan", config)
    assert result.metadata["precision"] == "fp16" and result.onnx_built.name == "model.fp16.onnx"
    feeds = bert_example()
    reference = _ort(onnx_path, feeds)
    with TensorRTRunner(result.plan_path) as runner:
        got = runner.infer(feeds)
    for name, ref in reference.items():
        cosine = _mean_cosine(ref, got[name])
        assert cosine >= tolerance("fp16").min_mean_cosine, f"{name}: mean cosine {cosine}"


def test_qdq_engine_is_int8_and_matches_onnxruntime(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from engines.tensorrt.builder import TensorRTBuildConfig, build_engine
    from engines.tensorrt.runner import TensorRTRunner

    onnx_path = tmp_path / "qdq.onnx"
    onnx.save(_qdq_matmul(), onnx_path)
    result = build_engine(onnx_path, tmp_path / "qdq.plan", TensorRTBuildConfig())
    assert result.metadata["precision"] == "int8+fp16"
    feeds = {"x": np.random.default_rng(1).normal(size=(2, 16, 256)).astype(np.float32)}
    with TensorRTRunner(result.plan_path) as runner:
        got = runner.infer(feeds)["y"]
    cosine = _mean_cosine(_ort(onnx_path, feeds)["y"], got)
    assert cosine >= tolerance("int8").min_mean_cosine, f"mean cosine {cosine}"


def test_timing_cache_is_written_and_reused(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from engines.tensorrt.builder import TensorRTBuildConfig, build_engine

    onnx_path = tmp_path / "qdq.onnx"
    onnx.save(_qdq_matmul(), onnx_path)
    cache = tmp_path / "timing.cache"
    build_engine(onnx_path, tmp_path / "a.plan", TensorRTBuildConfig(timing_cache=cache))
    first = cache.stat().st_size
    assert first > 0
    build_engine(onnx_path, tmp_path / "b.plan", TensorRTBuildConfig(timing_cache=cache))
    assert cache.stat().st_size >= first


def test_foreign_engine_is_refused(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from engines.tensorrt.builder import TensorRTBuildConfig, build_engine
    from engines.tensorrt.runner import TensorRTRunner

    onnx_path = tmp_path / "qdq.onnx"
    onnx.save(_qdq_matmul(), onnx_path)
    result = build_engine(onnx_path, tmp_path / "qdq.plan", TensorRTBuildConfig())
    metadata = json.loads(result.metadata_path.read_text())
    metadata["tensorrt_version"] = "9.0.0.0"
    result.metadata_path.write_text(json.dumps(metadata))
    with pytest.raises(InputError, match=r"built with TensorRT 9\.0\.0\.0"):
        TensorRTRunner(result.plan_path).__enter__()


def test_sparse_weights_are_reported(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import torch

    from engines.tensorrt.builder import TensorRTBuildConfig, build_engine

    onnx_path = tmp_path / "sparse.onnx"
    onnx.save(_qdq_matmul(1024, 1024, sparse=True), onnx_path)
    result = build_engine(onnx_path, tmp_path / "sparse.plan", TensorRTBuildConfig())
    assert result.metadata["sparse_weights"] and "SPARSE_WEIGHTS" in result.metadata["builder_flags"]
    assert result.metadata["sparsity"] == result.sparsity.to_json()
    if torch.cuda.get_device_capability(0) >= (8, 0):  # sparse tensor cores: Ampere and later
        assert result.sparsity.eligible, "TensorRT logged no layer eligible for sparse math"
