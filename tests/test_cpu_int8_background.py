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


def test_metadata_stripped_before_the_build_in_both_processes(tmp_path: Path) -> None:
    """The export's model.onnx carries 2:4 sparsity tags on nodes; the CPU file built from it does not, whether
    built here or in the child (the same file as building from an untagged copy)."""
    model = mlp_with_outlier()
    onnx.save(model, tmp_path / "plain.onnx")
    excluded = frozenset({"layer2/MatMul"})  # an excluded MatMul keeps its node (and would keep its tag)
    for node in model.graph.node:
        entry = node.metadata_props.add()
        entry.key, entry.value = "sparsity_2to4", "{}"
    onnx.save(model, tmp_path / "tagged.onnx")
    plain = cpu_int8.build(tmp_path / "plain.onnx", tmp_path / "plain.int8.onnx", excluded)
    here = cpu_int8.build(tmp_path / "tagged.onnx", tmp_path / "here.onnx", excluded, False, "sparsity_2to4")
    child = cpu_int8.BackgroundBuild(
        tmp_path / "tagged.onnx", tmp_path / "child.onnx", excluded, False, "sparsity_2to4"
    )
    assert child.result() == tmp_path / "child.onnx"
    written = onnx.load(here)
    assert not [n.name for n in written.graph.node if n.metadata_props]
    assert "layer2/MatMul" in [n.name for n in written.graph.node]
    assert here.read_bytes() == (tmp_path / "child.onnx").read_bytes()
    assert here.read_bytes() == plain.read_bytes()
