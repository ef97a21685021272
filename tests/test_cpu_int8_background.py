"""exporter/quantize/cpu_int8.py BackgroundBuild: the child interpreter writes the file `build` writes in-process,
and a failed child hands the build back (None) instead of raising."""

from __future__ import annotations

import os
import subprocess
import sys
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


def test_child_environment_adds_malloc_settings_unless_the_user_tunes_malloc(monkeypatch) -> None:
    for name in [n for n in os.environ if n.startswith("MALLOC_") or n == "GLIBC_TUNABLES"]:
        monkeypatch.delenv(name)
    assert cpu_int8.child_environment().items() >= cpu_int8.CHILD_MALLOC_ENV.items()
    monkeypatch.setenv("MALLOC_ARENA_MAX", "2")
    environment = cpu_int8.child_environment()
    assert environment["MALLOC_ARENA_MAX"] == "2" and "MALLOC_MMAP_THRESHOLD_" not in environment


def test_the_child_build_imports_no_torch() -> None:
    """The child saves through exporter.export.external_data: importing torch there cost it ~1 s of CPU."""
    code = (
        "import sys; from exporter.quantize.cpu_int8 import build; "
        "import exporter.export.external_data; print('torch' in sys.modules)"
    )
    root = str(Path(cpu_int8.__file__).resolve().parents[2])
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, check=True)
    assert out.stdout.strip() == "False"
