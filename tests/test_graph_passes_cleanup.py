"""Cleanup passes: exact counts on the golden cleanup graph, nothing to do on a clean graph,
idempotence, and outputs unchanged on ONNX Runtime (optimizations off)."""

from __future__ import annotations

import graph_models as gm
import pytest

from graph_passes.eliminate_common_subexpressions import EliminateCommonSubexpressions
from graph_passes.fold_constants import FoldConstants
from graph_passes.infer_shapes import InferShapes
from graph_passes.remove_dead_nodes import RemoveDeadNodes
from graph_passes.remove_identity_and_casts import RemoveIdentityAndCasts

# pass factory -> exact counts on gm.cleanup_graph() (inputs typed, as after infer-shapes). Every pass
# ends with a dead-node sweep (a rewrite orphans nodes), so each also drops the graph's one dead Neg;
# onnxscript's constant folder also resolves the no-op Identity and Cast it meets on the way.
EXPECTED = {
    FoldConstants: {"Mul": -1, "Identity": -1, "Cast": -1, "Neg": -1},
    RemoveIdentityAndCasts: {"Identity": -1, "Cast": -1, "Neg": -1},
    EliminateCommonSubexpressions: {"Relu": -1, "Neg": -1},
    RemoveDeadNodes: {"Neg": -1},
}


@pytest.mark.parametrize("factory", list(EXPECTED), ids=lambda f: f.name)
def test_positive_exact_counts(factory):
    model = gm.with_shapes(gm.cleanup_graph())
    _, report = gm.apply_pass(factory(), model)
    assert report.counts == EXPECTED[factory]
    assert report.modified


@pytest.mark.parametrize("factory", list(EXPECTED), ids=lambda f: f.name)
def test_negative_nothing_to_do(factory):
    model = gm.with_shapes(
        gm.decomposed_rmsnorm_graph()
    )  # no identity, cast, duplicate, dead or foldable node
    _, report = gm.apply_pass(factory(), model)
    assert report.counts == {}
    assert not report.modified


@pytest.mark.parametrize("factory", [*EXPECTED, InferShapes], ids=lambda f: f.name)
def test_idempotent(factory):
    once, _ = gm.apply_pass(factory(), gm.with_shapes(gm.cleanup_graph()))
    twice, report = gm.apply_pass(factory(), once)
    assert report.counts == {}
    assert gm.op_histogram(twice) == gm.op_histogram(once)


@pytest.mark.parametrize("factory", list(EXPECTED), ids=lambda f: f.name)
def test_numeric(factory):
    model = gm.with_shapes(gm.cleanup_graph())
    rewritten, _ = gm.apply_pass(factory(), model)
    gm.assert_same_outputs(model, rewritten, gm.random_feeds(model))


def test_infer_shapes_types_values():
    model = gm.cleanup_graph()
    del model.graph.value_info[:]
    _, report = gm.apply_pass(InferShapes(), model)
    assert report.counts["values_typed"] == 7  # 8 node outputs; "y" is typed already as a graph output


def test_pass_error_names_the_pass():
    import onnx_ir as ir

    from graph_passes.base import GraphPassError

    class Broken(FoldConstants):
        name = "broken-pass"

        def apply(self, model, report):
            raise ValueError("boom")

    with pytest.raises(GraphPassError, match=r"^broken-pass: boom"):
        Broken()(ir.serde.deserialize_model(gm.cleanup_graph()))


def test_fold_constants_keeps_weight_dequantize():
    """DequantizeLinear(int8 constant) is foldable in principle; folding it would drop the INT8 weight."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    nodes = [
        helper.make_node("DequantizeLinear", ["w_int8", "scale", "zp"], ["w"]),
        helper.make_node("MatMul", ["x", "w"], ["y"]),
    ]
    inits = [
        numpy_helper.from_array(np.arange(16, dtype=np.int8).reshape(4, 4), "w_int8"),
        numpy_helper.from_array(np.float32(0.1), "scale"),
        numpy_helper.from_array(np.int8(0), "zp"),
    ]
    graph = helper.make_graph(
        nodes,
        "qdq",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["b", 4])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["b", 4])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    out, report = gm.apply_pass(FoldConstants(), model)
    assert report.counts == {}
    assert gm.op_histogram(out) == {"DequantizeLinear": 1, "MatMul": 1}
