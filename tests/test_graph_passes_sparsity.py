"""2:4 sparsity tagging and enforcement on golden MatMul chains."""

from __future__ import annotations

import json

import graph_models as gm
import numpy as np
import onnx
import onnx_ir as ir
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from graph_passes.tag_sparsity_2to4 import METADATA_KEY, TagSparsity2to4, is_2to4, prune_2to4, weight_site


def _two_four(rows: int, cols: int, seed: int) -> np.ndarray:
    """A [rows, cols] matrix with exactly 2 non-zeros in every group of 4 along rows (the K axis)."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((rows, cols)).astype(np.float32)
    mask = np.zeros((rows // 4, 4, cols), dtype=bool)
    for g in range(rows // 4):
        for c in range(cols):
            mask[g, rng.choice(4, 2, replace=False), c] = True
    return w * mask.reshape(rows, cols)


def golden() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    return gm.matmul_weights_graph(
        {
            "w_odd": rng.standard_normal((258, 256)).astype(np.float32),  # K not divisible by 4
            "w_sparse": _two_four(256, 256, 1),
            "w_dense": rng.standard_normal((256, 256)).astype(np.float32),
            "w_small": _two_four(256, 8, 2),  # N below min_dim
        }
    )


def _statuses(report):
    return {d["weight"]: d["status"] for d in report.details}


def test_tag_census_and_metadata():
    out, report = gm.apply_pass(TagSparsity2to4("tag"), golden())
    assert _statuses(report) == {
        "w_odd": "skipped: reduction dim not divisible by 4",
        "w_sparse": "eligible",
        "w_dense": "dense",
        "w_small": "skipped: smaller than min_dim=256",
    }
    assert report.counts == {"tagged": 4}
    tags = {n.name: {p.key: p.value for p in n.metadata_props}[METADATA_KEY] for n in out.graph.node}
    assert tags["matmul_w_sparse"] == "eligible"
    summary = json.loads({p.key: p.value for p in out.metadata_props}[METADATA_KEY])
    assert summary["eligible"] == 1 and summary["weights"][0]["shape"] == [256, 256]


def test_tag_negative_and_idempotent():
    once, _ = gm.apply_pass(TagSparsity2to4("tag"), golden())
    _, report = gm.apply_pass(TagSparsity2to4("tag"), once)
    assert report.counts == {} and not report.modified
    dense_only = gm.matmul_weights_graph({"w": np.ones((256, 256), np.float32)})
    _, report = gm.apply_pass(TagSparsity2to4("tag"), dense_only)
    assert _statuses(report) == {"w": "dense"}


def test_tag_does_not_change_outputs():
    model = golden()
    out, _ = gm.apply_pass(TagSparsity2to4("tag"), model)
    gm.assert_same_outputs(model, out, gm.random_feeds(model))


def test_enforce_prunes_dense_weights_only():
    out, report = gm.apply_pass(TagSparsity2to4("enforce"), golden())
    assert report.counts == {"tagged": 4, "pruned": 1}
    pruned = {i.name: onnx.numpy_helper.to_array(i) for i in out.graph.initializer}
    assert is_2to4(pruned["w_dense"], 0)
    assert np.array_equal(pruned["w_sparse"], _two_four(256, 256, 1))  # already 2:4: untouched
    detail = next(d for d in report.details if d["weight"] == "w_dense")
    assert 0.3 < detail["relative_error"] < 0.7  # Gaussian weights lose ~half their energy... but not all
    _, again = gm.apply_pass(TagSparsity2to4("enforce"), out)
    assert again.counts == {}


def test_enforce_leaves_tied_weights_alone():
    model = gm.matmul_weights_graph(
        {"w": np.random.default_rng(0).standard_normal((256, 256)).astype(np.float32)}
    )
    model.graph.node.append(onnx.helper.make_node("Identity", ["w"], ["w_copy"]))
    model.graph.output.append(
        onnx.helper.make_tensor_value_info("w_copy", onnx.TensorProto.FLOAT, [256, 256])
    )
    _, report = gm.apply_pass(TagSparsity2to4("enforce"), model)
    assert "pruned" not in report.counts
    assert "non-GEMM uses" in _statuses(report)["w"]


def test_reduction_axis_per_op():
    w = ir.Value(name="w", const_value=ir.tensor(np.zeros((8, 4), np.float32)))
    x = ir.Value(name="x")
    gemm = ir.Node("", "Gemm", [x, w], attributes=[ir.AttrInt64("transB", 1)])
    conv = ir.Node("", "Conv", [x, w])
    matmul = ir.Node("", "MatMul", [x, w])
    assert [weight_site(n).axis for n in (matmul, gemm, conv)] == [0, 1, 1]


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 6), st.integers(1, 5), st.integers(0, 2**16))
def test_prune_2to4_keeps_the_two_largest(groups, cols, seed):
    w = np.random.default_rng(seed).standard_normal((4 * groups, cols)).astype(np.float32)
    p = prune_2to4(w, 0)
    assert is_2to4(p, 0)
    for g in range(groups):
        for c in range(cols):
            block, kept = np.abs(w[4 * g : 4 * g + 4, c]), p[4 * g : 4 * g + 4, c]
            assert set(np.flatnonzero(kept)) == set(np.argsort(block)[2:])
            assert np.array_equal(kept[kept != 0], w[4 * g : 4 * g + 4, c][kept != 0])


def test_bad_mode():
    with pytest.raises(ValueError, match="enforce"):
        TagSparsity2to4("always")
