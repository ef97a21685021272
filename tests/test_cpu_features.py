"""The CPU INT8 file's weight range follows whether ONNX Runtime's u8 x s8 kernel saturates on the CPU."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from exporter.quantize import cpu_int8 as quantize_cpu
from exporter.quantize.cpu_features import IntegerGemm, detect, reduce_weight_range

AVX2_ONLY = "processor\t: 0\nflags\t\t: fpu sse sse2 avx fma avx2\n"
SPR = "processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512bw avx512_vnni amx_int8 amx_tile\n"


@pytest.mark.parametrize(
    ("text", "machine", "saturates", "isa"),
    [
        (AVX2_ONLY, "x86_64", True, "x86_64 avx2 (no VNNI)"),
        (SPR, "x86_64", False, "x86_64 avx512_vnni amx_int8"),
        ("flags\t: avx2 avx_vnni\n", "x86_64", False, "x86_64 avx_vnni"),
        ("flags\t: avx2 avx512f avx512bw\n", "x86_64", True, "x86_64 avx512bw (no VNNI)"),
        ("processor\t: 0\n", "x86_64", None, "x86_64 (no flags listed)"),
        ("", "aarch64", False, "aarch64"),
        ("", "riscv64", None, "riscv64"),
    ],
)
def test_detect_reads_the_flags(tmp_path, text, machine, saturates, isa) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(text)
    assert detect(cpuinfo, machine) == IntegerGemm(isa, saturates)


def test_unreadable_flags_are_unknown(tmp_path) -> None:
    assert detect(tmp_path / "missing", "x86_64").saturates is None


@pytest.mark.parametrize(
    ("choice", "saturates", "reduced"),
    [
        ("auto", True, True),
        ("auto", False, False),
        ("auto", None, True),  # unknown: the safe range
        ("full", True, False),
        ("reduced", False, True),
    ],
)
def test_weight_range_choice(choice, saturates, reduced) -> None:
    got, why = reduce_weight_range(choice, IntegerGemm("x86_64 test", saturates))
    assert got is reduced
    assert ("7-bit" if reduced else "8-bit") in why


@pytest.mark.parametrize(("reduce_range", "limit"), [(False, 127), (True, 64)])
def test_reduced_range_stores_7_bit_weights(tmp_path, reduce_range, limit) -> None:
    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.standard_normal((32, 16)).astype(np.float32), "W")
    node = helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [4, 32])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [4, 16])],
        [weight],
    )
    source = tmp_path / "fp32.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), source)
    quantize_cpu.build(source, tmp_path / "int8.onnx", frozenset(), reduce_range)
    stored = [
        numpy_helper.to_array(t)
        for t in onnx.load(tmp_path / "int8.onnx").graph.initializer
        if t.data_type == onnx.TensorProto.INT8 and t.dims == [32, 16]
    ]
    assert len(stored) == 1
    assert int(np.abs(stored[0].astype(np.int32)).max()) == limit
