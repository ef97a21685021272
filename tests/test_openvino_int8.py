"""The OpenVINO INT8 file's two recipes (exporter/quantize/openvino_int8.py): NNCF's transformer preset where
nncf imports (asymmetric u8 activations, per-channel s8 weights, checked in the file and numerically on
OpenVINO), else the Q/DQ file rewritten, with the reason in the report; an NNCF failure falls back."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from engines import load_runner
from engines.openvino_runner import openvino_unavailable_reason
from exporter.quantize import openvino_int8
from exporter.quantize.openvino_int8 import build_openvino_file, nncf_unavailable_reason

OV_SKIP = openvino_unavailable_reason()
NNCF_SKIP = nncf_unavailable_reason()
needs_nncf = pytest.mark.skipif(
    OV_SKIP is not None or NNCF_SKIP is not None, reason=f"OpenVINO: {OV_SKIP}; NNCF: {NNCF_SKIP}"
)
HIDDEN, FFN = 64, 128


def _mlp(path: Path) -> Path:
    """x -> MatMul -> Relu -> MatMul: a transformer FFN's shape, with a one-sided activation (Relu) whose
    range an asymmetric u8 quantizer covers with twice the resolution of a symmetric one."""
    rng = np.random.default_rng(0)
    w1 = (rng.normal(size=(HIDDEN, FFN)) / np.sqrt(HIDDEN)).astype(np.float32)
    w2 = (rng.normal(size=(FFN, HIDDEN)) / np.sqrt(FFN)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
            helper.make_node("Relu", ["h"], ["a"], name="act"),
            helper.make_node("MatMul", ["a", "w2"], ["y"], name="fc2"),
        ],
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", HIDDEN])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "s", HIDDEN])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def _samples(count: int = 8, seed: int = 1) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.normal(size=(2, 16, HIDDEN)).astype(np.float32)} for _ in range(count)]


def _array(model: onnx.ModelProto, name: str) -> np.ndarray:
    """An initializer or Constant's value (NNCF's ONNX backend writes some as Constant nodes)."""
    for t in model.graph.initializer:
        if t.name == name:
            return numpy_helper.to_array(t)
    node = next(n for n in model.graph.node if n.op_type == "Constant" and n.output[0] == name)
    return numpy_helper.to_array(node.attribute[0].t)


def _fp32(path: Path, x: np.ndarray) -> np.ndarray:
    with load_runner(path, backend="onnxruntime", threads=1) as runner:
        return runner.infer({"x": x})["y"]


@needs_nncf
def test_nncf_recipe_writes_asymmetric_activations_and_per_channel_weights(tmp_path: Path) -> None:
    fp32 = _mlp(tmp_path / "fp32.onnx")
    out = tmp_path / "model.int8.openvino.onnx"
    section = build_openvino_file(tmp_path / "unused.onnx", out, fp32_path=fp32, samples=_samples())
    assert section["recipe"] == "nncf" and section["from"] == "fp32.onnx" and section["nncf_seconds"] > 0
    model = onnx.load(str(out))
    inits = {t.name: _array(model, t.name) for t in model.graph.initializer}
    quantize = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    assert len(quantize) == 2  # the input of each MatMul
    # activations: the one-sided Relu output gets the whole 8-bit grid (zero point at the grid's bottom:
    # u8 with 0, or s8 with -128), where the TensorRT file's symmetric s8 would use half of it
    producer = {out: n for n in model.graph.node for out in n.output}
    fc2 = next(n for n in model.graph.node if n.op_type == "MatMul" and n.name.startswith("fc2"))
    dequantize = producer[fc2.input[0]]
    zero = _array(model, producer[dequantize.input[0]].input[2])  # the QuantizeLinear before it
    assert dequantize.op_type == "DequantizeLinear" and zero.dtype in (np.int8, np.uint8)
    assert int(zero) == np.iinfo(zero.dtype).min  # all 256 steps on [0, max], not 128 as symmetric s8
    # weights: s8, symmetric (zero point 0), one scale per output channel
    weights = [n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits]
    assert len(weights) == 2
    for node in weights:
        assert inits[node.input[0]].dtype == np.int8 and inits[node.input[0]].ndim == 2
        scale, zero = _array(model, node.input[1]), _array(model, node.input[2])
        assert scale.size in (FFN, HIDDEN) and not np.any(zero)
    # numerically: OpenVINO runs it with INT8 kernels, close to fp32 on held-out inputs
    x = np.random.default_rng(7).normal(size=(2, 16, HIDDEN)).astype(np.float32)
    expected = _fp32(fp32, x)
    with load_runner(out, backend="openvino", threads=1) as runner:
        got = runner.infer({"x": x})["y"]
    cos = np.sum(got * expected, -1) / (np.linalg.norm(got, axis=-1) * np.linalg.norm(expected, axis=-1))
    assert float(cos.mean()) > 0.99, float(cos.mean())


def test_without_nncf_the_qdq_file_is_rewritten_and_the_report_says_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    qdq = _mlp(tmp_path / "qdq.onnx")  # stands in for the Q/DQ file: its float MatMuls become weight-only
    monkeypatch.setattr(openvino_int8, "nncf_unavailable_reason", lambda: "nncf does not import (gone)")
    section = build_openvino_file(qdq, tmp_path / "a.onnx", fp32_path=qdq, samples=_samples(2))
    assert section["recipe"] == "qdq" and section["why_not_nncf"] == "nncf does not import (gone)"
    assert section["weight_only_int8"] == ["fc1", "fc2"]
    # a KV-cache decoder passes no samples: the Q/DQ recipe, whether or not NNCF is installed
    monkeypatch.undo()
    section = build_openvino_file(qdq, tmp_path / "b.onnx")
    assert section["recipe"] == "qdq" and "KV-cache decoders" in section["why_not_nncf"]


def test_an_nncf_failure_falls_back_to_the_qdq_recipe(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    qdq = _mlp(tmp_path / "qdq.onnx")

    def fails(*_: object) -> onnx.ModelProto:
        raise RuntimeError("unsupported node\nstack trace ...")

    monkeypatch.setattr(openvino_int8, "nncf_unavailable_reason", lambda: None)
    monkeypatch.setattr(openvino_int8, "nncf_ptq", fails)
    section = build_openvino_file(qdq, tmp_path / "c.onnx", fp32_path=qdq, samples=_samples(2))
    assert section["recipe"] == "qdq"
    assert section["why_not_nncf"] == "nncf.quantize failed: unsupported node"
    assert (tmp_path / "c.onnx").is_file()


def _same_file(a: Path, b: Path) -> None:
    """Same nodes, same initializer values (their encodings may differ: inline vs reloaded external data)."""
    x, y = onnx.load(str(a)), onnx.load(str(b))
    assert [n.SerializeToString() for n in x.graph.node] == [n.SerializeToString() for n in y.graph.node]
    xs, ys = ({t.name: numpy_helper.to_array(t) for t in m.graph.initializer} for m in (x, y))
    assert xs.keys() == ys.keys()
    for name, value in xs.items():
        assert value.dtype == ys[name].dtype and np.array_equal(value, ys[name]), name


@needs_nncf
def test_nncf_in_a_forked_process_writes_the_same_file(tmp_path: Path) -> None:
    fp32 = _mlp(tmp_path / "fp32.onnx")
    here = build_openvino_file(
        tmp_path / "unused.onnx", tmp_path / "here.onnx", fp32_path=fp32, samples=_samples()
    )
    job = openvino_int8.start_nncf(fp32, _samples(), tmp_path / "forked.onnx")
    assert job is not None
    section = build_openvino_file(tmp_path / "unused.onnx", tmp_path / "forked.onnx", job=job)
    assert (
        section["recipe"] == "nncf"
        and section["from"] == "fp32.onnx"
        and "forked process" in section["ran"]
        and section["process_cpu_s"] > 0
    )
    assert section["nncf_version"] == here["nncf_version"] and section["nncf_seconds"] > 0
    _same_file(tmp_path / "here.onnx", tmp_path / "forked.onnx")


@needs_nncf
def test_nncf_gets_the_weights_as_external_data_and_computes_the_same(tmp_path: Path) -> None:
    """NNCF's external-data path (each of its model copies holds the graph only) gives the file that the
    weights held inline give."""
    import nncf

    fp32 = _mlp(tmp_path / "fp32.onnx")
    inline = nncf.quantize(
        onnx.load(str(fp32)),
        nncf.Dataset(_samples()),
        model_type=nncf.ModelType.TRANSFORMER,
        subset_size=len(_samples()),
    )
    onnx.save(inline, tmp_path / "inline.onnx")
    onnx.save(openvino_int8.nncf_ptq(fp32, _samples()), tmp_path / "external.onnx")
    _same_file(tmp_path / "inline.onnx", tmp_path / "external.onnx")


def _forked_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fails: object) -> dict[str, object]:
    qdq = _mlp(tmp_path / "qdq.onnx")
    monkeypatch.setattr(openvino_int8, "nncf_unavailable_reason", lambda: None)
    monkeypatch.setattr(openvino_int8, "nncf_ptq", fails)  # the forked child inherits the patch
    monkeypatch.setattr(openvino_int8.importlib.util, "find_spec", lambda name: object())
    job = openvino_int8.start_nncf(qdq, _samples(2), tmp_path / "d.onnx")
    assert job is not None
    return build_openvino_file(qdq, tmp_path / "d.onnx", job=job)


def test_a_failure_in_the_forked_process_falls_back_to_the_qdq_recipe(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fails(*_: object) -> onnx.ModelProto:
        raise RuntimeError("unsupported node\nstack trace ...")

    section = _forked_failure(tmp_path, monkeypatch, fails)
    assert section["recipe"] == "qdq" and section["why_not_nncf"] == "nncf.quantize failed: unsupported node"
    assert (tmp_path / "d.onnx").is_file()


def test_a_dead_forked_process_falls_back_to_the_qdq_recipe(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import os

    section = _forked_failure(tmp_path, monkeypatch, lambda *_: os._exit(3))
    assert section["recipe"] == "qdq"
    assert (
        section["why_not_nncf"] == "nncf.quantize failed: NNCF's process ended without a result (exit code 3)"
    )


def test_nncf_that_does_not_import_in_the_forked_process_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    qdq = _mlp(tmp_path / "qdq.onnx")
    monkeypatch.setattr(openvino_int8, "nncf_unavailable_reason", lambda: "nncf does not import (broken)")
    monkeypatch.setattr(openvino_int8.importlib.util, "find_spec", lambda name: object())
    job = openvino_int8.start_nncf(qdq, _samples(2), tmp_path / "e.onnx")
    assert job is not None
    section = build_openvino_file(qdq, tmp_path / "e.onnx", job=job)
    assert section["recipe"] == "qdq" and section["why_not_nncf"] == "nncf does not import (broken)"


def test_a_cancelled_job_leaves_no_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import time

    monkeypatch.setattr(openvino_int8, "nncf_unavailable_reason", lambda: None)
    monkeypatch.setattr(openvino_int8, "nncf_ptq", lambda *_: time.sleep(60))
    monkeypatch.setattr(openvino_int8.importlib.util, "find_spec", lambda name: object())
    job = openvino_int8.start_nncf(_mlp(tmp_path / "qdq.onnx"), _samples(2), tmp_path / "f.onnx")
    assert job is not None
    job.cancel()
    assert not job._process.is_alive() and not (tmp_path / "f.onnx").exists()


@needs_nncf
def test_nncfs_sessions_in_the_forked_process_take_one_thread_without_spinning(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import nncf.onnx.engine as engine

    monkeypatch.setattr(engine, "rt", engine.rt)  # restored after the test: the patch is the child's only
    openvino_int8._one_thread_sessions()
    options = engine.rt.SessionOptions()
    assert options.intra_op_num_threads == 1
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
