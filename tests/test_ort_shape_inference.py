"""exporter/quantize/ort_shape_inference.py: quantize_dynamic's shape inferences done in memory give ONNX Runtime's
models byte for byte (each inference, and whole CPU INT8 files with and without it), fall back to ORT's file round
trip where inference needs a weight's data, and are installed only for the ONNX Runtime versions read."""

from __future__ import annotations

import hashlib
import importlib
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
from onnx import TensorProto, helper
from onnxruntime.quantization.quant_utils import load_model_with_shape_infer
from quant_test_models import DIM, _init, _model, mlp_with_outlier

from exporter.quantize import cpu_int8
from exporter.quantize import ort_shape_inference as shapes

QUANTIZE = importlib.import_module("onnxruntime.quantization.quantize")
ONNX_QUANTIZER = importlib.import_module("onnxruntime.quantization.onnx_quantizer")
ORIGINAL_LOAD = QUANTIZE.save_and_reload_model_with_shape_infer
ORIGINAL_RELOAD = ONNX_QUANTIZER.save_and_reload_model_with_shape_infer

if not onnxruntime.__version__.startswith(shapes.TESTED_VERSIONS):
    pytest.skip(f"onnxruntime {onnxruntime.__version__}: the patch is not installed", allow_module_level=True)


def _gemm() -> onnx.ModelProto:
    """Gemm (transB) layers with constant weights: ONNXQuantizer replaces them by MatMul + Add, so its second
    inference has new tensors to type. Node metadata on each node (stripped by the builds)."""
    rng = np.random.default_rng(3)
    nodes, inits, current = [], [], "x"
    for i in range(2):
        inits += [
            _init(f"w{i}", rng.normal(0, 0.3, (DIM, DIM)).astype(np.float32)),
            _init(f"b{i}", rng.normal(0, 0.1, DIM).astype(np.float32)),
        ]
        out = "y" if i == 1 else f"h{i}"
        nodes.append(helper.make_node("Gemm", [current, f"w{i}", f"b{i}"], [out], name=f"gemm{i}", transB=1))
        current = out
    model = _model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", DIM])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", DIM])],
        inits,
    )
    for node in model.graph.node:
        for key, value in (("sparsity_2to4", "candidate"), ("kept", "yes")):
            entry = node.metadata_props.add()
            entry.key, entry.value = key, value
    return model


def _large_shape() -> onnx.ModelProto:
    """A Reshape whose shape initializer is 128 int64s (1024 bytes: detached), which its inference reads: the
    strict inference of the detached copy fails, and ONNX Runtime's file round trip must run."""
    rng = np.random.default_rng(4)
    shape = np.ones(128, np.int64)
    shape[-1] = DIM
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
        helper.make_node("Reshape", ["h", "shape"], ["y"], name="reshape"),
    ]
    return _model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, DIM])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape.tolist())],
        [_init("w", rng.normal(0, 0.3, (DIM, DIM)).astype(np.float32)), _init("shape", shape)],
    )


MODELS = {"mlp": mlp_with_outlier, "gemm": _gemm, "large_shape": _large_shape}
IN_MEMORY = {"mlp": True, "gemm": True, "large_shape": False}


@pytest.fixture
def installed(monkeypatch):  # type: ignore[no-untyped-def]
    """The patch installed for one test (ORT's functions restored after it)."""
    monkeypatch.setattr(QUANTIZE, "save_and_reload_model_with_shape_infer", ORIGINAL_LOAD)
    monkeypatch.setattr(ONNX_QUANTIZER, "save_and_reload_model_with_shape_infer", ORIGINAL_RELOAD)
    assert shapes.install()
    assert shapes.installed()


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("name", MODELS)
def test_each_inference_gives_onnx_runtimes_model(tmp_path: Path, name: str) -> None:
    model = MODELS[name]()
    given = model.SerializeToString()
    onnx.save(model, tmp_path / "model.onnx")
    expected = load_model_with_shape_infer(tmp_path / "model.onnx")  # what quantize_dynamic(path) starts from
    before = dict(shapes.calls)
    loaded = shapes.load_with_shape_infer(model)
    assert loaded.SerializeToString() == expected.SerializeToString()
    reloaded = shapes.reload_with_shape_infer(loaded)
    assert reloaded.SerializeToString() == ORIGINAL_RELOAD(loaded).SerializeToString()
    assert model.SerializeToString() == given  # the caller's model is left as it was
    path = "in memory" if IN_MEMORY[name] else "onnxruntime"
    assert shapes.calls[path] == before.get(path, 0) + 2


def test_reload_marks_the_reloaded_tensors_as_onnx_load_does() -> None:
    """The visible trace of ORT's external-data round trip: large tensors come back with data_location DEFAULT
    set, small ones without it."""
    reloaded = shapes.reload_with_shape_infer(shapes.load_with_shape_infer(mlp_with_outlier()))
    marked = {t.name: t.HasField("data_location") for t in reloaded.graph.initializer}
    assert marked == {t.name: t.raw_data.__len__() >= 1024 - 33 for t in reloaded.graph.initializer}
    assert any(marked.values()) and not all(marked.values())
    assert not any(t.external_data for t in reloaded.graph.initializer)


@pytest.mark.parametrize("strip", [None, "sparsity_2to4"])
@pytest.mark.parametrize("name", MODELS)
def test_cpu_int8_files_are_identical_with_the_patch(tmp_path: Path, request, name: str, strip) -> None:  # type: ignore[no-untyped-def]
    onnx.save(MODELS[name](), tmp_path / "fp32.onnx")
    assert not shapes.installed()
    plain = cpu_int8.build(tmp_path / "fp32.onnx", tmp_path / "plain.onnx", frozenset(), False, strip)
    request.getfixturevalue("installed")
    before = dict(shapes.calls)
    patched = cpu_int8.build(tmp_path / "fp32.onnx", tmp_path / "patched.onnx", frozenset(), False, strip)
    assert _sha256(patched) == _sha256(plain)
    path = "in memory" if IN_MEMORY[name] else "onnxruntime"
    assert shapes.calls[path] == before.get(path, 0) + 2
    assert not (tmp_path / "patched.source.onnx").exists()  # the stripped model stays in memory


def test_a_source_with_external_data_is_read_by_onnx_runtime(tmp_path: Path, installed) -> None:  # type: ignore[no-untyped-def]
    """build hands ORT the file (it loads the weights from the file's folder), and the file is the same."""
    onnx.save(mlp_with_outlier(), tmp_path / "fp32.onnx", save_as_external_data=True, location="fp32.data")
    assert cpu_int8._in_memory_source(tmp_path / "fp32.onnx", None) is None
    patched = cpu_int8.build(tmp_path / "fp32.onnx", tmp_path / "patched.onnx", frozenset(), False)
    with pytest.MonkeyPatch.context() as undo:
        undo.setattr(QUANTIZE, "save_and_reload_model_with_shape_infer", ORIGINAL_LOAD)
        undo.setattr(ONNX_QUANTIZER, "save_and_reload_model_with_shape_infer", ORIGINAL_RELOAD)
        plain = cpu_int8.build(tmp_path / "fp32.onnx", tmp_path / "plain.onnx", frozenset(), False)
    assert _sha256(patched) == _sha256(plain)


def test_install_leaves_other_onnx_runtime_versions_alone(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(QUANTIZE, "save_and_reload_model_with_shape_infer", ORIGINAL_LOAD)
    monkeypatch.setattr(ONNX_QUANTIZER, "save_and_reload_model_with_shape_infer", ORIGINAL_RELOAD)
    monkeypatch.setattr(onnxruntime, "__version__", "1.33.0")
    assert not shapes.install()
    assert not shapes.installed()
    assert QUANTIZE.save_and_reload_model_with_shape_infer is ORIGINAL_LOAD
    assert ONNX_QUANTIZER.save_and_reload_model_with_shape_infer is ORIGINAL_RELOAD


def test_the_child_build_infers_in_memory(tmp_path: Path, caplog) -> None:  # type: ignore[no-untyped-def]
    """BackgroundBuild's child installs the patch and logs it; the export's own process keeps ORT's functions."""
    onnx.save(_gemm(), tmp_path / "fp32.onnx")
    with caplog.at_level("INFO", logger=cpu_int8.logger.name):
        child = cpu_int8.BackgroundBuild(
            tmp_path / "fp32.onnx", tmp_path / "child.onnx", frozenset(), False, "sparsity_2to4"
        )
        assert child.result() == tmp_path / "child.onnx"
    assert "shape inference: 2 in memory, 0 by ONNX Runtime's files" in caplog.text
    assert not shapes.installed()
    plain = cpu_int8.build(
        tmp_path / "fp32.onnx", tmp_path / "plain.onnx", frozenset(), False, "sparsity_2to4"
    )
    assert _sha256(tmp_path / "child.onnx") == _sha256(plain)


def test_a_stripped_copy_that_would_get_a_data_file_is_left_to_onnx_runtime(
    tmp_path: Path, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    """Over save_onnx's external-data threshold, the stripped copy is written as before (with its .data file) and
    ORT reads it from there; the file is the same as without the patch."""
    from exporter.export import external_data

    onnx.save(_gemm(), tmp_path / "fp32.onnx")
    monkeypatch.setattr(external_data, "EXTERNAL_DATA_THRESHOLD_BYTES", 1000)
    plain = cpu_int8.build(
        tmp_path / "fp32.onnx", tmp_path / "plain.onnx", frozenset(), False, "sparsity_2to4"
    )
    assert (tmp_path / "plain.source.onnx.data").exists()
    assert cpu_int8._in_memory_source(tmp_path / "fp32.onnx", "sparsity_2to4") is None
    assert cpu_int8._in_memory_source(tmp_path / "fp32.onnx", None) is not None  # the file itself is inline
    monkeypatch.setattr(QUANTIZE, "save_and_reload_model_with_shape_infer", ORIGINAL_LOAD)
    monkeypatch.setattr(ONNX_QUANTIZER, "save_and_reload_model_with_shape_infer", ORIGINAL_RELOAD)
    assert shapes.install()
    patched = cpu_int8.build(
        tmp_path / "fp32.onnx", tmp_path / "patched.onnx", frozenset(), False, "sparsity_2to4"
    )
    assert (tmp_path / "patched.source.onnx.data").exists()
    assert _sha256(patched) == _sha256(plain)
