"""SmoothQuant-style migration: exact in fp32, and it rescues the planted outlier layer under static INT8."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from quant_test_models import mlp_with_outlier
from test_quantize import OUTLIER_LAYER, _data

from exporter.quantize.int8 import QuantConfig, quantize
from exporter.quantize.smooth import smooth


def _run(path: Path, x: np.ndarray) -> np.ndarray:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def test_smoothing_is_exact_in_fp32(tmp_path: Path) -> None:
    onnx.save(mlp_with_outlier(), tmp_path / "fp32.onnx")
    path, report = smooth(tmp_path / "fp32.onnx", tmp_path, _data(), QuantConfig())
    assert [s["matmuls"] for s in report["smoothed"]] == [[OUTLIER_LAYER]]
    x = _data().heldout["x"]
    err = np.abs(_run(path, x) - _run(tmp_path / "fp32.onnx", x))
    assert err.max() < 1e-4, f"max abs error {err.max():.3g} at {np.unravel_index(err.argmax(), err.shape)}"


def test_smoothing_removes_the_need_to_exclude_the_outlier_layer(tmp_path: Path) -> None:
    onnx.save(mlp_with_outlier(), tmp_path / "fp32.onnx")
    config = QuantConfig(method="max", smoothing=True, cpu_variant=False)
    result = quantize(tmp_path / "fp32.onnx", tmp_path / "out", _data(), config)
    assert result.report["tensorrt"]["auto_excluded"] == []
    assert result.report["tensorrt"]["sensitivity"]["all_quantized_cosine"] >= 0.99
    assert result.report["smoothing"]["smoothed"]


def test_nothing_to_smooth_returns_the_model_itself(tmp_path: Path) -> None:
    """No outlier channel: the fp32 file is the smoothed one (nothing written, the same graph for the ranges)."""
    onnx.save(mlp_with_outlier(outlier=1.0), tmp_path / "fp32.onnx")
    (tmp_path / "w").mkdir()
    path, report = smooth(tmp_path / "fp32.onnx", tmp_path / "w", _data(), QuantConfig())
    assert path == tmp_path / "fp32.onnx" and report["smoothed"] == []
    assert not (tmp_path / "w" / "smoothed.onnx").exists()


def test_smoothing_pass_measures_the_ranges_maxima(tmp_path: Path, monkeypatch) -> None:
    """With nothing smoothed, the Q/DQ ranges take max |x| and the values from SmoothQuant's pass: one pass
    over the calibration set instead of three, and the same ranges as measured directly (two passes)."""
    import onnx_ir as ir

    from exporter.quantize import ranges as ranges_module
    from graph_passes.insert_qdq import activation_tensors, plan

    onnx.save(mlp_with_outlier(outlier=1.0), tmp_path / "fp32.onnx")
    names = activation_tensors(plan(ir.load(str(tmp_path / "fp32.onnx"))))
    direct = ranges_module.collect_ranges(tmp_path / "fp32.onnx", names, _data(), "mse")
    passes = []
    original = ranges_module._passes
    monkeypatch.setattr(ranges_module, "_passes", lambda *a: passes.append(a[-1]) or original(*a))
    sessions = []
    build = ranges_module._session_with_outputs
    monkeypatch.setattr(ranges_module, "_session_with_outputs", lambda *a: sessions.append(a[1]) or build(*a))
    config = QuantConfig(method="mse", smoothing=True)
    result = quantize(tmp_path / "fp32.onnx", tmp_path / "out", _data(), config)
    assert result.report["smoothing"]["smoothed"] == []
    assert result.report["tensorrt"]["ranges"] == direct
    # the CPU file's outlier split measures nothing unless the search treats a layer
    assert result.report["cpu"]["auto_excluded"] == [] and passes == ["smoothing"]
    assert len(sessions) == 1 and set(names) <= set(sessions[0])  # SmoothQuant's session measured them
