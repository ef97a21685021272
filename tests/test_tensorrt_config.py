"""The TensorRT build configuration as pure code: profiles, flags per major version, sparsity tags,
precision from the graph, and `prepare_onnx` (checks + FP16 copy + default profiles). No TensorRT needed."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from engines.base import TensorSpec
from engines.onnx_inputs import onnx_input_specs
from engines.tensorrt.builder import (
    DEFAULT_MAX_BATCH,
    DEFAULT_MAX_SEQ,
    SPARSITY_COUNT_KEY,
    SPARSITY_NODE_KEY,
    SPARSITY_NODE_VALUE,
    TensorRTBuildConfig,
    builder_flags_for,
    default_profiles,
    network_flags_for,
    prepare_onnx,
    profiles_from_shapes,
    sparse_weights_enabled,
)
from engines.tensorrt.config import precision_label, resolve_config
from engines.tensorrt.profiles import OptimizationProfile, ShapeRange, check_profile, parse_shapes
from export_errors import InputError

BERT_INPUTS = [
    TensorSpec("input_ids", np.dtype("int64"), ("batch", "sequence")),
    TensorSpec("attention_mask", np.dtype("int64"), ("batch", "sequence")),
]


# ----------------------------------------------------------------------------- profiles
def test_profiles_from_trtexec_strings() -> None:
    profile = profiles_from_shapes(
        "input_ids:1x1,attention_mask:1x1",
        "input_ids:8x128,attention_mask:8x128",
        "input_ids:32x512,attention_mask:32x512",
    )
    assert profile.shapes["input_ids"] == ShapeRange((1, 1), (8, 128), (32, 512))
    assert profile.shapes["attention_mask"] == ShapeRange((1, 1), (8, 128), (32, 512))
    assert OptimizationProfile.from_json(profile.to_json()) == profile


def test_profiles_missing_strings_take_opt() -> None:
    profile = profiles_from_shapes(None, "x:4x16", "x:8x32")
    assert profile.shapes["x"] == ShapeRange((4, 16), (4, 16), (8, 32))


@pytest.mark.parametrize(
    ("min_s", "opt_s", "max_s", "message"),
    [
        ("x:1x1", "x:8x128", "x:4x512", "min <= opt <= max"),
        ("x:1x1", "y:8x128", "x:4x512", "different inputs"),
        ("x:1x1", "x:8", "x:8x8", "ranks differ"),
        ("x:1xa", None, None, "integers"),
        ("x:0x4", None, None, ">= 1"),
        ("1x4", None, None, "NAME:D"),
        ("x:1,x:2", None, None, "twice"),
        (None, None, None, "at least one"),
    ],
)
def test_bad_profile_strings_name_the_flag(min_s, opt_s, max_s, message) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(InputError, match=message) as info:
        profiles_from_shapes(min_s, opt_s, max_s)
    assert "Shapes" in str(info.value)


def test_input_names_with_colons_and_scalars() -> None:
    assert parse_shapes("'a:b':2x3,scalar:", "--optShapes") == {"a:b": (2, 3), "scalar": ()}


def test_default_profiles_from_the_export_axes() -> None:
    profile = default_profiles(
        [*BERT_INPUTS, TensorSpec("pixel", np.dtype("float32"), ("batch", 3))], 16, 256
    )
    assert profile.shapes["input_ids"] == ShapeRange((1, 1), (8, 128), (16, 256))
    assert profile.shapes["pixel"] == ShapeRange((1, 3), (8, 3), (16, 3))
    small = default_profiles(BERT_INPUTS, 2, 16)
    assert small.shapes["attention_mask"] == ShapeRange((1, 1), (2, 16), (2, 16))
    with pytest.raises(InputError, match="neither batch nor sequence"):
        default_profiles([TensorSpec("x", np.dtype("float32"), ("batch", "sequence", "channels"))], 2, 8)


def test_profile_checked_against_the_model_inputs() -> None:
    good = profiles_from_shapes("input_ids:1x1,attention_mask:1x1", None, "input_ids:4x8,attention_mask:4x8")
    assert check_profile(BERT_INPUTS, good) == []
    partial = profiles_from_shapes("input_ids:1x1", None, "input_ids:4x8")
    assert check_profile(BERT_INPUTS, partial) == [
        "input 'attention_mask' ('batch', 'sequence') is dynamic but has no shape in the profile"
    ]
    fixed = [TensorSpec("x", np.dtype("float32"), ("batch", 3))]
    problems = check_profile(fixed, profiles_from_shapes("x:1x4,y:1", None, None))
    assert any("axis 1 is fixed at 3" in p for p in problems) and any("'y'" in p for p in problems)


# ----------------------------------------------------------------------------- flags
STRONG = TensorRTBuildConfig(fp16=True, fp16_in_graph=True)
STRONG_QDQ_SPARSE = dataclasses.replace(STRONG, qdq_in_graph=True, sparse_weights=True)
WEAK_QDQ = TensorRTBuildConfig(strongly_typed=False, fp16=True, qdq_in_graph=True)


@pytest.mark.parametrize("major", [10, 11])
def test_strongly_typed_sets_no_precision_flags(major: int) -> None:
    assert network_flags_for(major, STRONG) == ["STRONGLY_TYPED"]
    assert builder_flags_for(major, STRONG) == []
    assert builder_flags_for(major, STRONG_QDQ_SPARSE) == ["SPARSE_WEIGHTS"]


def test_tensorrt10_weak_typing_keeps_the_precision_flags() -> None:
    assert network_flags_for(10, WEAK_QDQ) == []
    assert builder_flags_for(10, WEAK_QDQ) == ["INT8", "FP16"]
    assert builder_flags_for(10, dataclasses.replace(WEAK_QDQ, qdq_in_graph=False, fp16=False)) == []


def test_tensorrt11_refuses_weak_typing() -> None:
    with pytest.raises(InputError, match="strongly typed networks only"):
        builder_flags_for(11, WEAK_QDQ)


@pytest.mark.parametrize("major", [10, 11])
def test_fp16_must_be_in_the_graph_when_strongly_typed(major: int) -> None:
    with pytest.raises(InputError, match="convert_fp16") as info:
        builder_flags_for(major, TensorRTBuildConfig(fp16=True, fp16_in_graph=False))
    assert ("strongly_typed=False" in str(info.value)) == (major == 10)


@pytest.mark.parametrize("major", [8, 9, 12])
def test_unsupported_major_versions(major: int) -> None:
    with pytest.raises(InputError, match="not supported"):
        builder_flags_for(major, STRONG)


def test_precision_labels() -> None:
    assert precision_label(STRONG_QDQ_SPARSE) == "int8+fp16"
    assert precision_label(dataclasses.replace(STRONG_QDQ_SPARSE, fp16=False)) == "int8"
    assert precision_label(STRONG) == "fp16"
    assert precision_label(TensorRTBuildConfig(fp16=False)) == "fp32"
    assert precision_label(WEAK_QDQ) == "int8+fp16"


# ----------------------------------------------------------------------------- graphs
def _matmul_model(tag: bool = False, count: str | None = None, qdq: bool = False) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.normal(size=(8, 8)).astype(np.float32), "w")
    inits = [w]
    nodes = []
    x = "x"
    if qdq:
        inits += [
            numpy_helper.from_array(np.array(0.05, np.float32), "s"),
            numpy_helper.from_array(np.array(0, np.int8), "zp"),
        ]
        nodes += [
            helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["xq"], name="q"),
            helper.make_node("DequantizeLinear", ["xq", "s", "zp"], ["xdq"], name="dq"),
        ]
        x = "xdq"
    matmul = helper.make_node("MatMul", [x, "w"], ["y"], name="fc")
    if tag:
        entry = matmul.metadata_props.add()
        entry.key, entry.value = SPARSITY_NODE_KEY, SPARSITY_NODE_VALUE
    nodes.append(matmul)
    graph = helper.make_graph(
        nodes,
        "mm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "sequence", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "sequence", 8])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    if count is not None:
        helper.set_model_props(model, {SPARSITY_COUNT_KEY: count})
    return model


def test_sparse_flag_from_the_2to4_tags() -> None:
    assert not sparse_weights_enabled(_matmul_model())
    assert sparse_weights_enabled(_matmul_model(tag=True))
    assert sparse_weights_enabled(_matmul_model(count="3"))
    assert not sparse_weights_enabled(_matmul_model(count="0"))
    with pytest.raises(InputError, match=SPARSITY_COUNT_KEY):
        sparse_weights_enabled(_matmul_model(count="many"))


def test_resolve_config_reads_the_graph() -> None:
    resolved = resolve_config(_matmul_model(tag=True, qdq=True), TensorRTBuildConfig())
    assert resolved.qdq_in_graph and resolved.sparse_weights and not resolved.fp16_in_graph
    assert builder_flags_for(10, dataclasses.replace(resolved, fp16_in_graph=True)) == ["SPARSE_WEIGHTS"]
    forced = resolve_config(_matmul_model(tag=True), TensorRTBuildConfig(sparse_weights=False))
    assert forced.sparse_weights is False


def test_prepare_onnx_writes_the_fp16_copy_and_default_profile(tmp_path) -> None:  # type: ignore[no-untyped-def]
    src = tmp_path / "model.onnx"
    onnx.save(_matmul_model(qdq=True), src)
    path, config = prepare_onnx(src, tmp_path / "out", TensorRTBuildConfig())
    assert path == tmp_path / "out" / "model.fp16.onnx" and path.is_file()
    assert config.fp16_in_graph and config.qdq_in_graph and precision_label(config) == "int8+fp16"
    assert config.profiles[0].shapes["x"] == ShapeRange(
        (1, 1, 8), (8, 128, 8), (DEFAULT_MAX_BATCH, DEFAULT_MAX_SEQ, 8)
    )
    converted = onnx.load(str(path))
    assert {i.name: i.data_type for i in converted.graph.initializer}["w"] == TensorProto.FLOAT16
    assert [s.dtype for s in onnx_input_specs(converted)] == [np.dtype("float32")]
    assert builder_flags_for(11, config) == []  # what build_engine will ask of TensorRT 11


def test_prepare_onnx_fp32_and_weakly_typed_leave_the_graph(tmp_path) -> None:  # type: ignore[no-untyped-def]
    src = tmp_path / "model.onnx"
    onnx.save(_matmul_model(), src)
    path, config = prepare_onnx(src, tmp_path, TensorRTBuildConfig(fp16=False))
    assert path == src and precision_label(config) == "fp32"
    path, config = prepare_onnx(src, tmp_path, TensorRTBuildConfig(strongly_typed=False))
    assert path == src and builder_flags_for(10, config) == ["FP16"]


def test_prepare_onnx_refuses_bad_profiles_and_missing_files(tmp_path) -> None:  # type: ignore[no-untyped-def]
    src = tmp_path / "model.onnx"
    onnx.save(_matmul_model(), src)
    bad = TensorRTBuildConfig(profiles=(profiles_from_shapes("x:1x1x4", None, "x:2x8x4"),))
    with pytest.raises(InputError, match="axis 2 is fixed at 8"):
        prepare_onnx(src, tmp_path, bad)
    with pytest.raises(InputError, match="no such ONNX file"):
        prepare_onnx(tmp_path / "missing.onnx", tmp_path, TensorRTBuildConfig())


def _stub_members(enum: str) -> set[str]:
    """Members of a TensorRT enum as the installed tensorrt-stubs (TensorRT 10.x) declare them."""
    import importlib.util
    import re
    from pathlib import Path

    spec = importlib.util.find_spec("tensorrt_bindings")
    locations = list(spec.submodule_search_locations or []) if spec else []
    stub = next((Path(p) / "tensorrt.pyi" for p in locations if (Path(p) / "tensorrt.pyi").is_file()), None)
    if stub is None:
        pytest.skip("tensorrt-stubs are not installed (pip install --no-deps tensorrt-stubs)")
    block = stub.read_text().split(f"\nclass {enum}:", 1)[1].split("\nclass ", 1)[0]
    return set(re.findall(rf"^    (\w+): typing\.ClassVar\[{enum}\]", block, flags=re.MULTILINE))


def test_flag_names_exist_in_tensorrt10() -> None:
    """`build_engine` looks flags up by name: every name we can produce for TensorRT 10 must exist."""
    configs = [STRONG, STRONG_QDQ_SPARSE, WEAK_QDQ, dataclasses.replace(WEAK_QDQ, sparse_weights=True)]
    builder_names = {name for config in configs for name in builder_flags_for(10, config)}
    network_names = {name for config in configs for name in network_flags_for(10, config)}
    assert builder_names == {"INT8", "FP16", "SPARSE_WEIGHTS"} and network_names == {"STRONGLY_TYPED"}
    assert builder_names <= _stub_members("BuilderFlag")
    assert network_names <= _stub_members("NetworkDefinitionCreationFlag")
