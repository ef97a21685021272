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


def _early_case(tmp_path: Path, monkeypatch, weights: str):  # type: ignore[no-untyped-def]
    """A small source made eligible for the background build, its QuantConfig with the file as the CPU
    file's fused source, and a record of the BackgroundBuilds `quantize` starts itself."""
    from exporter.quantize import int8

    monkeypatch.setattr(int8, "BACKGROUND_BUILD_BYTES", 0)
    onnx.save(mlp_with_outlier(), tmp_path / "fp32.onnx")
    config = int8.QuantConfig(
        method="max",
        smoothing=False,
        cpu_graph_passes_family="test",
        cpu_fused_source=tmp_path / "fp32.onnx",
        cpu_weight_range=weights,
    )
    started: list[tuple[object, ...]] = []
    original = cpu_int8.BackgroundBuild
    monkeypatch.setattr(cpu_int8, "BackgroundBuild", lambda *a: started.append(a) or original(*a))
    return config, started


def test_a_first_build_started_early_is_taken_when_it_is_the_build_needed(
    tmp_path: Path, monkeypatch
) -> None:
    """`start_cpu_first_build` (run when the export's model.onnx is written) gives `quantize` the CPU file's
    first build: no second child, and the same CPU file as when `quantize` starts it."""
    from test_quantize import _data

    from exporter.quantize import int8

    config, started = _early_case(tmp_path, monkeypatch, "full")
    (tmp_path / "early").mkdir()
    early = int8.start_cpu_first_build(tmp_path / "early", config)
    assert early is not None and len(started) == 1
    result = int8.quantize(tmp_path / "fp32.onnx", tmp_path / "a", _data(), config, cpu_first_build=early)
    assert len(started) == 1  # taken, not started again
    assert result.report["cpu"]["fusion"]["applied"]
    result = int8.quantize(tmp_path / "fp32.onnx", tmp_path / "b", _data(), config)
    assert len(started) == 2
    assert (tmp_path / "a" / int8.CPU_FILE).read_bytes() == (tmp_path / "b" / int8.CPU_FILE).read_bytes()


def test_a_first_build_started_early_for_other_settings_is_stopped(tmp_path: Path, monkeypatch) -> None:
    from test_quantize import _data

    from exporter.quantize import int8

    config, started = _early_case(tmp_path, monkeypatch, "full")
    (tmp_path / "early").mkdir()
    other = cpu_int8.BackgroundBuild(tmp_path / "fp32.onnx", tmp_path / "early" / "x.onnx", frozenset(), True)
    assert other.builds(tmp_path / "fp32.onnx", frozenset(), True)  # 7-bit weights: not what `config` asks
    assert not other.builds(tmp_path / "fp32.onnx", frozenset(), False)
    int8.quantize(tmp_path / "fp32.onnx", tmp_path / "a", _data(), config, cpu_first_build=other)
    assert len(started) == 2 and started[-1][3] is False  # quantize started the 8-bit build itself
    assert other.process.poll() is not None  # stopped or finished, never left running


def test_no_early_first_build_with_user_exclusions_or_a_small_source(tmp_path: Path, monkeypatch) -> None:
    from exporter.quantize import int8

    config, started = _early_case(tmp_path, monkeypatch, "full")
    excluding = int8.QuantConfig(**{**config.__dict__, "exclude_names": ("layer2/MatMul",)})
    assert int8.start_cpu_first_build(tmp_path, excluding) is None
    monkeypatch.setattr(int8, "BACKGROUND_BUILD_BYTES", 2**40)
    assert int8.start_cpu_first_build(tmp_path, config) is None
    assert started == []
