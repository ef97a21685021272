"""The INT8 orchestrator on a seeded MLP with a planted outlier layer: sensitivity keeps exactly that layer in
high precision, both artifacts pass the held-out gate, the gate fails when it must, the report says why."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from quant_test_models import DIM, mlp_with_outlier

from export_errors import ValidationError
from exporter.quantize.calibration import CalibrationData
from exporter.quantize.int8 import CPU_FILE, TENSORRT_FILE, QuantConfig, quantize, token_cosines

OUTLIER_LAYER = "layer2/MatMul"


def _data(seed: int = 0) -> CalibrationData:
    x = np.random.default_rng(seed).normal(0, 1, (96, 4, DIM)).astype(np.float32)
    return CalibrationData({"x": x[:64]}, {"x": x[64:]}, batch=16, source="seeded normal")


def _numpy_reference(model: onnx.ModelProto):  # type: ignore[no-untyped-def]
    """The MLP computed in numpy from the graph's initializers: an independent fp32 reference."""
    weights = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}

    def forward(feeds: dict[str, np.ndarray]) -> np.ndarray:
        h = feeds["x"]
        for i in range(4):
            h = h * weights.get(f"outlier_scale_{i}", 1.0)
            h = np.maximum(h @ weights[f"w{i}"] + weights[f"b{i}"], 0.0)
        return h

    return forward


@pytest.fixture(scope="module")
def outlier_result(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    tmp = tmp_path_factory.mktemp("quant")
    model = mlp_with_outlier()
    onnx.save(model, tmp / "fp32.onnx")
    config = QuantConfig(method="max", smoothing=False)
    return quantize(tmp / "fp32.onnx", tmp / "out", _data(), config, reference=_numpy_reference(model))


@pytest.mark.parametrize("variant", ["tensorrt", "cpu"])
def test_sensitivity_keeps_the_planted_outlier_layer(outlier_result, variant: str) -> None:  # type: ignore[no-untyped-def]
    report = outlier_result.report[variant]
    assert report["sensitivity"]["all_quantized_cosine"] < 0.99  # the planted layer does break INT8
    assert report["auto_excluded"] == [OUTLIER_LAYER]
    worst = report["sensitivity"]["layer_error_worst_first"]
    assert worst[0]["node"] == OUTLIER_LAYER and worst[0]["error"] > 10 * worst[1]["error"]
    assert report["heldout_cosine"] >= 0.99


def test_artifacts_and_report(outlier_result) -> None:  # type: ignore[no-untyped-def]
    assert outlier_result.tensorrt_path.name == TENSORRT_FILE and outlier_result.cpu_path.name == CPU_FILE
    assert outlier_result.cosine == outlier_result.report["tensorrt"]["heldout_cosine"] >= 0.99
    trt = onnx.load(outlier_result.tensorrt_path)
    matmul_inputs = {n.name: list(n.input) for n in trt.graph.node if n.op_type == "MatMul"}
    assert matmul_inputs[OUTLIER_LAYER] == ["scaled_2", "w2"]  # untouched, fp32
    assert all(
        i.endswith("_dequantized") for n, ins in matmul_inputs.items() if n != OUTLIER_LAYER for i in ins
    )
    rules = {d["node"]: d["rule"] for d in outlier_result.report["tensorrt"]["decisions"]}
    assert rules[OUTLIER_LAYER] == "excluded by name"
    cpu = outlier_result.report["cpu"]
    assert cpu["outlier_split"]["layers"] == [OUTLIER_LAYER] and cpu["fp32_layers"] == []
    kernels = cpu["ort_optimized_graph_ops"]
    assert kernels.get("DynamicQuantizeMatMul", 0) + kernels.get("MatMulIntegerToFloat", 0) == 4
    assert kernels.get("MatMul") == 1  # only the thin outlier-channel MatMul stays fp32
    assert outlier_result.report["gate"]["passed"]
    assert set(outlier_result.report["files"]) == {TENSORRT_FILE, CPU_FILE}


def test_gate_fails_with_the_numbers(tmp_path: Path) -> None:
    onnx.save(mlp_with_outlier(), tmp_path / "fp32.onnx")
    config = QuantConfig(method="max", auto_exclude=False, smoothing=False, cpu_variant=False)
    with pytest.raises(
        ValidationError, match=r"target mean token cosine >= 0\.99; tensorrt: held-out .* 0 layers"
    ):
        quantize(tmp_path / "fp32.onnx", tmp_path / "out", _data(), config)


def test_gate_fails_when_the_budget_is_too_small(tmp_path: Path) -> None:
    onnx.save(mlp_with_outlier(), tmp_path / "fp32.onnx")
    config = QuantConfig(
        method="max", min_cosine=0.999999, max_excluded_fraction=0.25, smoothing=False, cpu_variant=False
    )
    with pytest.raises(ValidationError, match="1 layers in high precision"):
        quantize(tmp_path / "fp32.onnx", tmp_path / "out", _data(), config)


def test_user_exclusion_is_respected_without_search(tmp_path: Path) -> None:
    onnx.save(mlp_with_outlier(), tmp_path / "fp32.onnx")
    config = QuantConfig(method="percentile", exclude_regex=(r"^layer2/",), smoothing=False)
    result = quantize(tmp_path / "fp32.onnx", tmp_path / "out", _data(), config)
    assert result.report["tensorrt"]["sensitivity"]["all_quantized_cosine"] >= 0.99
    assert result.report["tensorrt"]["auto_excluded"] == [] and result.report["cpu"]["auto_excluded"] == []
    assert result.report["cpu"]["user_excluded"] == [OUTLIER_LAYER]


def test_token_cosine_ignores_padding() -> None:
    ref = np.ones((1, 3, 4), np.float32)
    out = ref.copy()
    out[0, 2] = -1.0  # a padded token that disagrees completely
    mask = np.array([[1, 1, 0]])
    assert token_cosines(ref, out, mask).tolist() == [1.0, 1.0]
    assert token_cosines(ref, out, None).tolist() == [1.0, 1.0, -1.0]


@pytest.mark.parametrize("masked", [True, False])
def test_token_cosines_with_reference_norms_computed_once_are_the_same_bits(masked: bool) -> None:
    """The judge computes each reference's row norms once (`row_norms`) and passes them to every candidate's
    `token_cosines`: the same cosines, bit for bit, as computing them inside (rows over several blocks)."""
    from exporter.quantize.int8 import COSINE_BLOCK_ROWS, row_norms

    rng = np.random.default_rng(0)
    ref = rng.standard_normal((3, COSINE_BLOCK_ROWS, 300)).astype(np.float32)
    out = ref + rng.standard_normal(ref.shape).astype(np.float32) * 0.3
    mask = (rng.random(ref.shape[:2]) < 0.7).astype(np.int64) if masked else None
    norms = row_norms(ref, mask)
    assert len(norms) == (int(mask.sum()) if masked else 3 * COSINE_BLOCK_ROWS)
    # the formula before the norms were shared: both norms summed per block beside the dot product
    flat_ref, flat_out = ref.reshape(-1, 300), out.reshape(-1, 300)
    rows = np.flatnonzero(mask.reshape(-1)) if masked else np.arange(len(flat_ref))
    want = np.concatenate(
        [
            np.einsum("ij,ij->i", r, o, dtype=np.float64)
            / (
                np.sqrt(np.einsum("ij,ij->i", r, r, dtype=np.float64))
                * np.sqrt(np.einsum("ij,ij->i", o, o, dtype=np.float64))
            )
            for block in np.array_split(rows, range(COSINE_BLOCK_ROWS, len(rows), COSINE_BLOCK_ROWS))
            for r, o in [(flat_ref[block], flat_out[block])]
        ]
    )
    assert np.array_equal(token_cosines(ref, out, mask), want)
    assert np.array_equal(token_cosines(ref, out, mask, norms), want)
    assert not np.array_equal(token_cosines(ref, out, mask, norms * 1.001), want)  # the norms are used


def test_cpu_layer_stays_fp32_without_outlier_split(tmp_path: Path) -> None:
    onnx.save(mlp_with_outlier(), tmp_path / "fp32.onnx")
    config = QuantConfig(method="max", cpu_outlier_channels=0, smoothing=False)
    result = quantize(tmp_path / "fp32.onnx", tmp_path / "out", _data(), config)
    cpu = result.report["cpu"]
    assert cpu["auto_excluded"] == [OUTLIER_LAYER] and cpu["fp32_layers"] == [OUTLIER_LAYER]
    assert cpu["ort_optimized_graph_ops"].get("DynamicQuantizeMatMul", 0) == 3
    assert cpu["ort_optimized_graph_ops"].get("MatMul") == 1
    assert result.cpu_cosine >= 0.99


def test_fusion_check_reads_real_tokens_only():
    """The CPU file's fusion check ignores padded positions (never read; a fused attention kernel fills them
    differently) and still sees an error on any real token."""
    from exporter.quantize.int8 import max_abs_on_real_tokens

    ref = np.zeros((2, 4, 3), dtype=np.float32)
    mask = np.array([[0, 0, 1, 1], [1, 1, 1, 1]], dtype=np.int64)  # left padding in the first row
    out = ref.copy()
    out[0, :2] = 5.0  # padding only
    assert max_abs_on_real_tokens(ref, out, mask) == 0.0
    assert max_abs_on_real_tokens(ref, out, None) == 5.0
    out[1, 3, 2] = 0.25  # a real token
    assert max_abs_on_real_tokens(ref, out, mask) == 0.25
    pooled = np.zeros((2, 3), dtype=np.float32)  # no [batch, sequence] layout: compared whole
    assert max_abs_on_real_tokens(pooled, pooled + 1.0, mask) == 1.0


def test_fusion_check_blocks_equal_the_selected_rows():
    """The fusion check's blocked maximum is the maximum over the selected rows' differences, bit for bit
    (several blocks of a wide last axis, a NaN propagates, a mask that selects nothing)."""
    from exporter.quantize import int8

    rng = np.random.default_rng(3)
    ref = rng.standard_normal((5, 300, 4099)).astype(np.float32)
    out = ref + rng.standard_normal(ref.shape).astype(np.float32) * 1e-3
    mask = (rng.random((5, 300)) < 0.6).astype(np.int64)

    def selected(r: np.ndarray, o: np.ndarray, m: np.ndarray) -> float:
        keep = m.astype(bool)
        return float(np.max(np.abs(r[keep] - o[keep])))

    assert int8.max_abs_on_real_tokens(ref, out, mask) == selected(ref, out, mask)
    assert int8.max_abs_on_real_tokens(ref, out, None) == float(np.max(np.abs(ref - out)))
    row = np.flatnonzero(mask.reshape(-1))[-1]
    out.reshape(-1, 4099)[row, 7] = np.nan
    assert np.isnan(int8.max_abs_on_real_tokens(ref, out, mask))
    assert int8.max_abs_on_real_tokens(ref, out, np.zeros_like(mask)) == 0.0


def test_tensorrt_model_is_handed_over_once_then_read(tmp_path):
    """The stage's target fusion takes the TensorRT graph kept in memory (no read of the file just written);
    once taken, or when none was kept, the file is read."""
    from exporter.quantize.int8 import QuantResult

    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    model = helper.make_model(graph)
    onnx.save(model, str(tmp_path / "m.onnx"))
    result = QuantResult(tmp_path / "m.onnx", None, {}, 1.0, tensorrt_model=model)
    assert result.take_tensorrt_model() is model and result.tensorrt_model is None
    assert result.take_tensorrt_model() == model  # read from the file
