"""exporter/quantize/cpu_int8.py BackgroundBuild: the child interpreter writes the file `build` writes in-process,
and a failed child hands the build back (None) instead of raising."""

from __future__ import annotations

from pathlib import Path

import onnx
from quant_test_models import mlp_with_outlier

from exporter.quantize import cpu_int8


def test_background_build_writes_the_same_file(tmp_path: Path) -> None:
    onnx.save(mlp_with_outlier(), tmp_path / "fp32.onnx")
    excluded = frozenset({"layer2/MatMul"})
    here = cpu_int8.build(tmp_path / "fp32.onnx", tmp_path / "here.onnx", excluded)
    child = cpu_int8.BackgroundBuild(tmp_path / "fp32.onnx", tmp_path / "child.onnx", excluded, False)
    assert child.result() == tmp_path / "child.onnx"
    assert (tmp_path / "child.onnx").read_bytes() == here.read_bytes()


def test_failed_background_build_returns_none(tmp_path: Path) -> None:
    child = cpu_int8.BackgroundBuild(tmp_path / "missing.onnx", tmp_path / "out.onnx", frozenset(), False)
    assert child.result() is None
    child = cpu_int8.BackgroundBuild(tmp_path / "missing.onnx", tmp_path / "out.onnx", frozenset(), False)
    child.close()  # stopped (or already finished): no error either way
