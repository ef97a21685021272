"""Pre-build checks on bad graphs built with onnx.helper: each problem names the node."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from engines.tensorrt.builder import prebuild_check, prepare_onnx
from engines.tensorrt.config import TensorRTBuildConfig
from export_errors import InputError


def _qdq_model(
    scale: float = 0.1, zero_point: int = 0, zp_dtype=np.int8, as_constant: bool = False
) -> onnx.ModelProto:  # type: ignore[no-untyped-def]
    scale_t = numpy_helper.from_array(np.array(scale, np.float32), "scale")
    zp_t = numpy_helper.from_array(np.array(zero_point, zp_dtype), "zp")
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "scale", "zp"], ["xq"], name="quant_x"),
        helper.make_node("DequantizeLinear", ["xq", "scale", "zp"], ["y"], name="dequant_x"),
    ]
    inits = [scale_t, zp_t]
    if as_constant:
        nodes = [
            helper.make_node("Constant", [], ["scale"], value=scale_t),
            helper.make_node("Constant", [], ["zp"], value=zp_t),
            *nodes,
        ]
        inits = []
    graph = helper.make_graph(
        nodes,
        "qdq",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_symmetric_qdq_passes() -> None:
    assert prebuild_check(_qdq_model()) == []


@pytest.mark.parametrize("as_constant", [False, True])
def test_nonzero_zero_point_is_named(as_constant: bool) -> None:
    problems = prebuild_check(_qdq_model(zero_point=3, as_constant=as_constant))
    assert [(p.node, p.op_type) for p in problems] == [
        ("quant_x", "QuantizeLinear"),
        ("dequant_x", "DequantizeLinear"),
    ]
    assert "zero point 'zp' is not 0" in problems[0].problem and "symmetric" in problems[0].problem


@pytest.mark.parametrize("scale", [0.0, -0.5, float("nan"), float("inf")])
def test_non_positive_or_non_finite_scale_is_named(scale: float) -> None:
    problems = prebuild_check(_qdq_model(scale=scale))
    assert {p.node for p in problems} == {"quant_x", "dequant_x"}
    assert all("scale 'scale'" in p.problem for p in problems)


def test_contrib_and_integer_ops_are_named() -> None:
    nodes = [
        helper.make_node("MatMulInteger", ["a", "b"], ["ab"], name="dyn_quant_matmul"),
        helper.make_node("Cast", ["ab"], ["abf"], to=TensorProto.FLOAT),
        helper.make_node("Gelu", ["abf"], ["y"], name="gelu_fused", domain="com.microsoft"),
    ]
    graph = helper.make_graph(
        nodes,
        "ort_cpu",
        [
            helper.make_tensor_value_info("a", TensorProto.UINT8, [2, 4]),
            helper.make_tensor_value_info("b", TensorProto.INT8, [4, 3]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    )
    problems = prebuild_check(model)
    assert [(p.node, p.op_type) for p in problems] == [
        ("dyn_quant_matmul", "MatMulInteger"),
        ("gelu_fused", "Gelu"),
    ]
    assert "com.microsoft" in str(problems[1])
    assert "node 'dyn_quant_matmul' (MatMulInteger)" in str(problems[0])


def test_prepare_onnx_refuses_with_the_node_names(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "bad.onnx"
    onnx.save(_qdq_model(zero_point=5), path)
    with pytest.raises(InputError, match="TensorRT would reject this graph: node 'quant_x'") as info:
        prepare_onnx(path, tmp_path, TensorRTBuildConfig(fp16=False))
    assert info.value.where == str(path)
