"""exporter/quantize/per_channel_weights.py: the vectorized per-channel weight quantization writes the bytes ONNX
Runtime's own per-channel loop writes (initializer for initializer, and whole quantize_dynamic files), falls back
to ORT's method for what it does not handle, and is installed only for the ONNX Runtime versions it was checked
against."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization.base_quantizer import BaseQuantizer
from onnxruntime.quantization.onnx_quantizer import ONNXQuantizer
from onnxruntime.quantization.quant_utils import QuantizationMode
from quant_test_models import mlp_with_outlier

from exporter.quantize import cpu_int8
from exporter.quantize import per_channel_weights as pcw

ORIGINAL = BaseQuantizer.quantize_weight_per_channel_impl

if not onnxruntime.__version__.startswith(pcw.TESTED_VERSIONS):
    pytest.skip(f"onnxruntime {onnxruntime.__version__}: the patch is not installed", allow_module_level=True)


def _weights(shape: tuple[int, ...], axis: int, seed: int) -> np.ndarray:
    """Random float32 weights whose channels along `axis` include the hard cases: all zero, constant
    (positive, negative), tiny (subnormal, and below float32's tiny / 254) and huge ranges (the float32
    difference overflows), exact .5 quotients (round half to even), one-signed channels."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal(shape) * rng.uniform(0.01, 3.0)).astype(np.float32)
    moved = np.moveaxis(w, axis, 0)  # a view: channel i is moved[i]
    specials = [
        lambda c: np.zeros_like(c),
        lambda c: np.full_like(c, 0.37),
        lambda c: np.full_like(c, -2.5),
        lambda c: c * np.float32(1e-42),  # subnormal values: degenerate scale
        lambda c: c * np.float32(1e-36),  # dr / dq just around float32's tiny
        lambda c: c * np.float32(1e37),
        lambda c: np.where(c > 0, np.float32(3e38), np.float32(-3e38)),  # rmax - rmin overflows float32
        lambda c: np.resize(np.array([127.0, 0.5, 1.5, 2.5, -3.5, -0.5], np.float32), c.shape),  # scale 1.0
        lambda c: np.abs(c) + np.float32(1.0),  # all positive
        lambda c: -np.abs(c) - np.float32(0.25),  # all negative
        lambda c: np.where(c > 0, np.float32(0.0), np.float32(-0.0)),  # signed zeros
    ]
    for i, special in enumerate(specials[: moved.shape[0] - 2]):
        moved[i + 1] = special(moved[i + 1])
    return w


def _quantizer(weight: np.ndarray, qtype: int, reduce_range: bool, extra: dict) -> ONNXQuantizer:
    """ORT's quantizer as quantize_dynamic makes it, on a one-MatMul model holding `weight`."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, None)
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
        "g",
        [x],
        [y],
        [numpy_helper.from_array(weight, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return ONNXQuantizer(
        model,
        True,
        reduce_range,
        QuantizationMode.IntegerOps,
        False,
        qtype,
        TensorProto.UINT8,
        None,
        [],
        [],
        ["MatMul"],
        extra,
    )


def _quantize(method, weight, axis, qtype, reduce_range, extra):  # type: ignore[no-untyped-def]
    """(returned names, every initializer after the call serialized) for `method` on a fresh quantizer."""
    quantizer = _quantizer(weight, qtype, reduce_range, extra)
    names = method(quantizer, "w", qtype, axis, True)
    return names, [(i.name, i.SerializeToString()) for i in quantizer.model.initializer()]


CASES = [
    ((96, 40), 1),
    ((40, 96), 0),
    ((13, 12), -1),
    ((3, 14, 5), 1),
    ((3, 5, 14), 2),
]
SETTINGS = [
    (TensorProto.INT8, {}),  # our build: symmetric s8
    (TensorProto.UINT8, {}),  # asymmetric u8
    (TensorProto.INT8, {"WeightSymmetric": False}),
    (TensorProto.UINT8, {"WeightSymmetric": True}),
    (TensorProto.INT8, {"MinimumRealRange": 0.05}),
    (TensorProto.UINT8, {"MinimumRealRange": 1e-4}),
]


@pytest.mark.parametrize(("shape", "axis"), CASES)
@pytest.mark.parametrize(("qtype", "extra"), SETTINGS)
@pytest.mark.parametrize("reduce_range", [False, True])
def test_initializers_are_bit_identical_to_onnx_runtimes(shape, axis, qtype, extra, reduce_range) -> None:  # type: ignore[no-untyped-def]
    weight = _weights(shape, axis, seed=len(CASES) * shape[0] + axis)
    expected = _quantize(ORIGINAL, weight, axis, qtype, reduce_range, extra)
    before = pcw.calls["vectorized"]
    got = _quantize(pcw.quantize_weight_per_channel_impl, weight, axis, qtype, reduce_range, extra)
    assert pcw.calls["vectorized"] == before + 1  # the vectorized path ran, not the fallback
    assert got[0] == expected[0]
    assert [name for name, _ in got[1]] == [name for name, _ in expected[1]]
    for (name, data), (_, want) in zip(got[1], expected[1], strict=True):
        assert data == want, name


def test_keep_float_weight_adds_only_scale_and_zero_point() -> None:
    weight = _weights((40, 96), 0, seed=5)
    expected = _quantizer(weight, TensorProto.INT8, False, {})
    got = _quantizer(weight, TensorProto.INT8, False, {})
    assert pcw.quantize_weight_per_channel_impl(got, "w", TensorProto.INT8, 0, True, True) == ORIGINAL(
        expected, "w", TensorProto.INT8, 0, True, True
    )
    serialized = [[i.SerializeToString() for i in q.model.initializer()] for q in (got, expected)]
    assert serialized[0] == serialized[1] and len(serialized[0]) == 3  # w, its scale, its zero point


def test_a_one_ulp_difference_is_caught(monkeypatch) -> None:
    """The comparison above fails when one scale is one ulp off (the test can fail)."""
    weight = _weights((40, 96), 0, seed=3)
    expected = _quantize(ORIGINAL, weight, 0, TensorProto.INT8, False, {})
    exact = pcw._scale_zero_point

    def one_ulp_off(*args):  # type: ignore[no-untyped-def]
        zero_point, scale = exact(*args)
        scale[5] = np.nextafter(scale[5], np.float32(np.inf))
        return zero_point, scale

    monkeypatch.setattr(pcw, "_scale_zero_point", one_ulp_off)
    got = _quantize(pcw.quantize_weight_per_channel_impl, weight, 0, TensorProto.INT8, False, {})
    assert got[1] != expected[1]


@pytest.mark.parametrize(
    ("qtype", "weight", "extra"),
    [
        (TensorProto.UINT16, np.linspace(-1, 1, 64, dtype=np.float32).reshape(8, 8), {}),
        (TensorProto.INT8, np.linspace(-1, 1, 64, dtype=np.float16).reshape(8, 8), {}),
        (TensorProto.INT16, np.linspace(-1, 1, 64, dtype=np.float32).reshape(8, 8), {}),
        (TensorProto.INT8, np.where(np.eye(8) > 0, np.inf, 1).astype(np.float32), {}),
        (
            TensorProto.INT8,
            np.linspace(-1, 1, 64, dtype=np.float32).reshape(8, 8),
            {"TensorQuantOverrides": {"w": [{"axis": 1, "rmin": -2.0, "rmax": 2.0}]}},
        ),
    ],
    ids=["uint16", "float16 weights", "int16", "infinite", "overrides"],
)
def test_what_it_does_not_handle_goes_to_onnx_runtime(qtype, weight, extra) -> None:  # type: ignore[no-untyped-def]
    with np.errstate(all="ignore"):
        expected = _quantize(ORIGINAL, weight, 1, qtype, False, extra)
        before = dict(pcw.calls)
        got = _quantize(pcw.quantize_weight_per_channel_impl, weight, 1, qtype, False, extra)
    assert pcw.calls["onnxruntime"] == before.get("onnxruntime", 0) + 1
    assert pcw.calls["vectorized"] == before.get("vectorized", 0)
    assert got == expected


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("reduce_range", [False, True])
def test_quantize_dynamic_file_is_bit_identical_with_the_patch(
    tmp_path: Path, monkeypatch, reduce_range
) -> None:  # type: ignore[no-untyped-def]
    onnx.save(mlp_with_outlier(), tmp_path / "fp32.onnx")
    plain = cpu_int8.build(tmp_path / "fp32.onnx", tmp_path / "plain.onnx", frozenset(), reduce_range)
    monkeypatch.setattr(
        ONNXQuantizer, "quantize_weight_per_channel_impl", ORIGINAL
    )  # restored after the test
    monkeypatch.setattr(pcw, "_original", None)
    assert pcw.install()
    assert ONNXQuantizer.quantize_weight_per_channel_impl is pcw.quantize_weight_per_channel_impl
    before = pcw.calls["vectorized"]
    patched = cpu_int8.build(tmp_path / "fp32.onnx", tmp_path / "patched.onnx", frozenset(), reduce_range)
    assert pcw.calls["vectorized"] > before
    assert _sha256(patched) == _sha256(plain)


def test_install_leaves_other_onnx_runtime_versions_alone(monkeypatch) -> None:
    monkeypatch.setattr(ONNXQuantizer, "quantize_weight_per_channel_impl", ORIGINAL)
    monkeypatch.setattr(pcw, "_original", None)
    monkeypatch.setattr(onnxruntime, "__version__", "1.33.0")
    assert not pcw.install()
    assert ONNXQuantizer.quantize_weight_per_channel_impl is ORIGINAL
    assert pcw._original is None


def test_the_child_build_reports_the_vectorized_path(tmp_path: Path, caplog) -> None:  # type: ignore[no-untyped-def]
    """BackgroundBuild's child installs the patch and logs which path quantized the weights; the export's own
    process keeps ONNX Runtime's method."""
    onnx.save(mlp_with_outlier(), tmp_path / "fp32.onnx")
    with caplog.at_level("INFO", logger=cpu_int8.logger.name):
        child = cpu_int8.BackgroundBuild(tmp_path / "fp32.onnx", tmp_path / "child.onnx", frozenset(), False)
        assert child.result() == tmp_path / "child.onnx"
    assert "vectorized, 0 by ONNX Runtime's loop" in caplog.text
    assert ONNXQuantizer.quantize_weight_per_channel_impl is ORIGINAL
