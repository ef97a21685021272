"""Each fusion pass on small golden graphs: exact counts, a negative case with the reason the rule gave,
idempotence, and outputs unchanged on ONNX Runtime (graph optimizations off, fp32 tolerance)."""

from __future__ import annotations

import graph_models as gm
import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from graph_passes.fold_residual_bias import FoldResidualBias
from graph_passes.fuse_attention import FuseAttention
from graph_passes.fuse_bias_gelu import FuseBiasGelu
from graph_passes.fuse_embed_layernorm import FuseEmbedLayerNorm
from graph_passes.fuse_gelu import FuseGelu
from graph_passes.fuse_layernorm import FuseLayerNorm
from graph_passes.fuse_matmul_bias import FuseMatMulBias
from graph_passes.fuse_rmsnorm import FuseRmsNorm
from graph_passes.fuse_skip_layernorm import FuseSkipLayerNorm


def _fused(graph_pass, model: onnx.ModelProto):
    return gm.apply_pass(graph_pass, gm.with_shapes(model))


def _replace_initializer(model: onnx.ModelProto, name: str, value) -> onnx.ModelProto:
    model = onnx.ModelProto.FromString(model.SerializeToString())
    for index, init in enumerate(model.graph.initializer):
        if init.name == name:
            model.graph.initializer[index].CopyFrom(
                numpy_helper.from_array(np.asarray(value, np.float32), name)
            )
    return model


def _skip_ln(simplified: bool) -> onnx.ModelProto:
    base = gm.skip_layernorm_graph(simplified=simplified)
    return gm.apply_pass(FuseRmsNorm(), base)[0] if simplified else base


# name -> (pass factory, golden graph factory, exact counts)
CASES = {
    "layernorm": (
        FuseLayerNorm,
        gm.decomposed_layernorm_graph,
        {
            "ReduceMean": -2,
            "Sub": -1,
            "Pow": -1,
            "Add": -2,
            "Sqrt": -1,
            "Div": -1,
            "Mul": -1,
            "LayerNormalization": 1,
            "applied": 2,
        },
    ),
    "rmsnorm": (
        FuseRmsNorm,
        gm.decomposed_rmsnorm_graph,
        {
            "Pow": -1,
            "ReduceMean": -1,
            "Add": -1,
            "Sqrt": -1,
            "Div": -1,
            "Mul": -2,
            "SimplifiedLayerNormalization": 1,
            "applied": 1,
        },
    ),
    "gelu-erf": (
        FuseGelu,
        lambda: gm.decomposed_gelu_graph("erf"),
        {"Div": -1, "Erf": -1, "Add": -1, "Mul": -2, "Gelu": 1, "applied": 1},
    ),
    "gelu-tanh": (
        FuseGelu,
        lambda: gm.decomposed_gelu_graph("tanh"),
        {"Pow": -1, "Mul": -4, "Add": -2, "Tanh": -1, "FastGelu": 1, "applied": 1},
    ),
    "bias-gelu": (
        FuseBiasGelu,
        lambda: gm.apply_pass(FuseGelu(), gm.decomposed_gelu_graph("erf"))[0],
        {"Add": -1, "Gelu": -1, "BiasGelu": 1, "applied": 1},
    ),
    "bias-fastgelu": (
        FuseBiasGelu,
        lambda: gm.apply_pass(FuseGelu(), gm.decomposed_gelu_graph("tanh"))[0],
        {"Add": -1, "applied": 1},
    ),
    "skip-layernorm": (
        FuseSkipLayerNorm,
        lambda: gm.skip_layernorm_graph(),
        {"Add": -1, "LayerNormalization": -1, "SkipLayerNormalization": 1, "applied": 1},
    ),
    "skip-rmsnorm": (
        FuseSkipLayerNorm,
        lambda: _skip_ln(simplified=True),
        {"Add": -1, "SimplifiedLayerNormalization": -1, "SkipSimplifiedLayerNormalization": 1, "applied": 1},
    ),
    "matmul-bias": (
        FuseMatMulBias,
        lambda: gm.apply_pass(FuseSkipLayerNorm(), gm.with_shapes(gm.skip_layernorm_graph()))[0],
        {"Add": -1, "applied": 1},
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_positive_exact_counts(case):
    factory, graph, counts = CASES[case]
    _, report = _fused(factory(), graph())
    assert report.counts == counts


@pytest.mark.parametrize("case", list(CASES))
def test_idempotent(case):
    factory, graph, _ = CASES[case]
    once, _ = _fused(factory(), graph())
    twice, report = _fused(factory(), once)
    assert report.counts == {}
    assert gm.op_histogram(twice) == gm.op_histogram(once)


@pytest.mark.parametrize("case", list(CASES))
def test_numeric(case):
    factory, graph, _ = CASES[case]
    model = graph()
    rewritten, _ = _fused(factory(), model)
    gm.assert_same_outputs(model, rewritten, gm.random_feeds(model))


def test_matmul_bias_keeps_bias_value():
    fused, _ = _fused(FuseMatMulBias(), CASES["matmul-bias"][1]())
    (node,) = [n for n in fused.graph.node if n.op_type == "SkipLayerNormalization"]
    assert list(node.input)[4] == "b"


# Negative cases: a near-miss the rule must refuse, and the reason it gives.
def test_layernorm_over_wrong_axis_is_not_fused():
    model = gm.decomposed_layernorm_graph()
    for node in model.graph.node:
        if node.op_type == "ReduceMean":
            del node.attribute[:]
            node.attribute.append(onnx.helper.make_attribute("axes", [1]))
    _, report = _fused(FuseLayerNorm(), model)
    assert report.counts == {}
    assert any("last axis" in d["reason"] for d in report.details)


def test_rmsnorm_with_wrong_exponent_is_not_fused():
    model = _replace_initializer(gm.decomposed_rmsnorm_graph(), "two", 3.0)
    _, report = _fused(FuseRmsNorm(), model)
    assert report.counts == {}


def test_gelu_with_wrong_constant_is_not_fused():
    model = _replace_initializer(gm.decomposed_gelu_graph("erf"), "half", 0.6)
    _, report = _fused(FuseGelu(), model)
    assert report.counts == {}
    assert any("0.5" in d["reason"] for d in report.details)


def test_bias_gelu_needs_a_1d_bias():
    model = gm.apply_pass(FuseGelu(), gm.decomposed_gelu_graph("erf"))[0]
    model = _replace_initializer(model, "b", np.ones((1, 16)))
    del model.graph.value_info[:]
    _, report = _fused(FuseBiasGelu(), model)
    assert report.counts == {}
    assert any("1-D" in d["reason"] for d in report.details)


def test_skip_layernorm_needs_3d_inputs():
    model = gm.skip_layernorm_graph()
    for value in [*model.graph.input, *model.graph.output]:
        del value.type.tensor_type.shape.dim[0]  # 2-D [s, hidden]
    _, report = _fused(FuseSkipLayerNorm(), model)
    assert report.counts == {}
    assert any("Shape mismatch" in d["reason"] for d in report.details)


def test_matmul_bias_needs_a_constant_bias():
    model = gm.apply_pass(FuseSkipLayerNorm(), gm.with_shapes(gm.skip_layernorm_graph()))[0]
    model = onnx.ModelProto.FromString(model.SerializeToString())
    bias = next(i for i in model.graph.initializer if i.name == "b")
    model.graph.initializer.remove(bias)
    model.graph.input.append(onnx.helper.make_tensor_value_info("b", onnx.TensorProto.FLOAT, [16]))
    _, report = _fused(FuseMatMulBias(), model)
    assert report.counts == {}


# ----------------------------------------------------------------------------- EmbedLayerNormalization
def _cleaned_bert() -> onnx.ModelProto:
    from graph_passes.pipeline import optimize

    return optimize(gm.bert_onnx(), "onnxruntime", stages=("cleanup",), family="bert")[0]


def test_embed_layernorm_counts_idempotence_and_numeric():
    model = _cleaned_bert()
    once, report = gm.apply_pass(FuseEmbedLayerNorm(), model)
    counts = {"EmbedLayerNormalization": 1, "Gather": -3, "Add": -2, "LayerNormalization": -1, "Cast": 3}
    assert report.counts == counts | {"applied": 1}
    twice, again = gm.apply_pass(FuseEmbedLayerNorm(), once)
    assert again.counts == {} and gm.op_histogram(twice) == gm.op_histogram(once)
    feeds = gm.bert_example(batch=3, seq=9)
    feeds["token_type_ids"][1, 4:] = 1  # both type rows are read
    gm.assert_same_outputs(model, once, feeds)


def test_embed_layernorm_needs_constant_tables():
    model = _cleaned_bert()
    name = next(i.name for i in model.graph.initializer if "token_type_embeddings" in i.name)
    table = next(i for i in model.graph.initializer if i.name == name)
    model.graph.initializer.remove(table)
    model.graph.input.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, table.dims))
    _, report = gm.apply_pass(FuseEmbedLayerNorm(), model)
    assert "EmbedLayerNormalization" not in report.counts
    assert any("not a constant 2-D weight" in d["reason"] for d in report.details)


# ----------------------------------------------------------------------------- residual-bias folding
def _fused_bert_without_fold() -> onnx.ModelProto:
    """The bert test model after every onnxruntime fusion except the fold itself."""
    from graph_passes.pipeline import optimize

    cleaned = optimize(gm.bert_onnx(), "onnxruntime", stages=("cleanup",), family="bert")[0]
    for graph_pass in (FuseLayerNorm(), FuseEmbedLayerNorm(), FuseGelu(), FuseBiasGelu(), FuseAttention()):
        cleaned = gm.apply_pass(graph_pass, cleaned)[0]
    return cleaned


def test_fold_residual_bias_counts_idempotence_and_numeric():
    model = _fused_bert_without_fold()
    once, report = gm.apply_pass(FoldResidualBias(), model)
    assert report.counts == {"Add": -4, "folded": 4}  # 2 layers x (attention output, FFN output)
    twice, again = gm.apply_pass(FoldResidualBias(), once)
    assert again.counts == {} and gm.op_histogram(twice) == gm.op_histogram(once)
    feeds = gm.bert_example(batch=3, seq=9)
    feeds["attention_mask"][1, :3] = 0
    gm.assert_same_outputs(model, once, feeds)


def _norm_then_constant_then_norm(hidden: int = 16) -> onnx.ModelProto:
    """What a removed post-norm sublayer leaves: LayerNorm(LayerNorm(x) + c) (restructure sublayers)."""
    from onnx import helper

    rng = np.random.default_rng(0)
    inits = [
        gm._init(name, rng.normal(size=hidden).astype(np.float32))
        for name in ("gamma1", "beta1", "c", "gamma2", "beta2")
    ]
    nodes = [
        helper.make_node("LayerNormalization", ["x", "gamma1", "beta1"], ["r"], axis=-1, epsilon=1e-5),
        helper.make_node("Add", ["r", "c"], ["h"]),
        helper.make_node("LayerNormalization", ["h", "gamma2", "beta2"], ["y"], axis=-1, epsilon=1e-5),
    ]
    return gm._model(nodes, [gm._f32("x", [2, 5, hidden])], [gm._f32("y", [2, 5, hidden])], inits)


def test_fold_residual_bias_moves_a_removed_sublayers_constant_into_the_previous_norm():
    model = _norm_then_constant_then_norm()
    once, report = gm.apply_pass(FoldResidualBias(), model)
    assert report.counts == {"Add": -1, "folded": 1}
    assert gm.op_histogram(once) == {"LayerNormalization": 2}
    twice, again = gm.apply_pass(FoldResidualBias(), once)
    assert again.counts == {} and gm.op_histogram(twice) == gm.op_histogram(once)
    x = np.random.default_rng(1).normal(size=(2, 5, 16)).astype(np.float32)
    gm.assert_same_outputs(model, once, {"x": x})


def test_fold_residual_bias_keeps_the_constant_when_the_norm_output_is_read_elsewhere():
    model = _norm_then_constant_then_norm()
    model.graph.output.append(onnx.helper.make_tensor_value_info("r", onnx.TensorProto.FLOAT, None))
    _, report = gm.apply_pass(FoldResidualBias(), model)
    assert report.counts == {}


def test_fold_residual_bias_leaves_a_residual_that_is_also_an_output():
    model = _fused_bert_without_fold()
    norm = next(n for n in model.graph.node if n.op_type == "EmbedLayerNormalization")
    model.graph.output.append(
        onnx.helper.make_tensor_value_info(norm.output[0], onnx.TensorProto.FLOAT, None)
    )
    _, report = gm.apply_pass(FoldResidualBias(), model)
    assert report.counts == {"Add": -3, "folded": 3}  # layer 0's attention residual keeps its Add
