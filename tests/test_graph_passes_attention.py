"""Attention fusions pass by pass on the exported head-pruned models: exact counts, per-layer head counts,
the reason on a near-miss, idempotence, and outputs unchanged on ONNX Runtime (optimizations off)."""

from __future__ import annotations

import functools

import graph_models as gm
import numpy as np
import onnx
import onnx.numpy_helper
import pytest

from graph_passes.fuse_attention import FuseAttention
from graph_passes.fuse_gqa import FuseGroupQueryAttention
from graph_passes.pipeline import optimize


@functools.cache
def _cleaned(name: str) -> bytes:
    model = {"bert": gm.bert_onnx, "llama": gm.llama_onnx}[name]()
    out, _ = optimize(model, "onnxruntime", stages=("cleanup",), family=name)
    return out.SerializeToString()


def cleaned(name: str) -> onnx.ModelProto:
    return onnx.load_from_string(_cleaned(name))


def _attrs(model, op_type):
    return [
        {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
        for n in model.graph.node
        if n.op_type == op_type
    ]


def test_encoder_attention_counts_and_heads():
    out, report = gm.apply_pass(FuseAttention(), cleaned("bert"))
    assert (
        report.counts["Attention"] == 2 and report.counts["Softmax"] == -2 and report.counts["applied"] == 2
    )
    assert report.counts["MatMul"] == -10  # per layer: Q, K, V projections and the two score/context MatMuls
    assert [a["num_heads"] for a in _attrs(out, "Attention")] == list(gm.BERT_HEADS)
    assert all(abs(a["scale"] - gm.HEAD_DIM**-0.5) < 1e-7 for a in _attrs(out, "Attention"))


def test_gqa_counts_and_heads():
    out, report = gm.apply_pass(FuseGroupQueryAttention(), cleaned("llama"))
    assert report.counts["GroupQueryAttention"] == 2 and report.counts["Softmax"] == -2
    heads = [(a["num_heads"], a["kv_num_heads"]) for a in _attrs(out, "GroupQueryAttention")]
    assert heads == list(gm.LLAMA_HEADS)


@pytest.mark.parametrize("name,factory", [("bert", FuseAttention), ("llama", FuseGroupQueryAttention)])
def test_idempotent(name, factory):
    once, _ = gm.apply_pass(factory(), cleaned(name))
    twice, report = gm.apply_pass(factory(), once)
    assert report.counts == {}
    assert gm.op_histogram(twice) == gm.op_histogram(once)


@pytest.mark.parametrize("name,factory", [("bert", FuseAttention), ("llama", FuseGroupQueryAttention)])
def test_numeric(name, factory):
    model = cleaned(name)
    out, _ = gm.apply_pass(factory(), model)
    feeds = gm.bert_example() if name == "bert" else gm.decoder_example()
    valid = None if name == "bert" else feeds["attention_mask"].astype(bool)
    gm.assert_same_outputs(model, out, feeds, valid=valid)


def test_encoder_attention_refuses_a_dynamic_head_size():
    model = cleaned("bert")
    # Layer 0's Q reshape target becomes a graph input: the head size is no longer readable.
    reshape = next(
        n for n in model.graph.node if n.op_type == "Reshape" and "layer.0/attention/self/Reshape" in n.name
    )
    reshape.input[1] = "dynamic_shape"
    model.graph.input.append(onnx.helper.make_tensor_value_info("dynamic_shape", onnx.TensorProto.INT64, [4]))
    _, report = gm.apply_pass(FuseAttention(), model)
    assert report.counts.get("Attention") == 1  # layer 1 still fuses
    reasons = [d["reason"] for d in report.details if d["layer"] == "0"]
    assert any("head size" in r for r in reasons), reasons


def test_gqa_refuses_a_rotary_table_it_cannot_prove():
    model = cleaned("llama")
    concat = next(n for n in model.graph.node if n.op_type == "Concat" and "rotary_emb" in n.name)
    neg = onnx.helper.make_node("Neg", [concat.input[1]], ["freqs_negated"], name="break_rotary")
    model.graph.node.insert(list(model.graph.node).index(concat), neg)
    concat.input[1] = "freqs_negated"  # cos(concat(f, -f)): halves no longer equal in general
    _, report = gm.apply_pass(FuseGroupQueryAttention(), model)
    assert "GroupQueryAttention" not in report.counts
    assert any("concat(f, f)" in d["reason"] for d in report.details)


def test_encoder_attention_takes_the_2d_padding_mask():
    """The exporter's [B, 1, 1, S] additive padding mask becomes the kernel's 2-D mask_index: one Cast of
    the attention_mask input feeds every layer, the mask arithmetic is gone, NEG is kept exactly."""
    out, _ = gm.apply_pass(FuseAttention(), cleaned("bert"))
    producers = {o: n for n in out.graph.node for o in n.output}
    for node in (n for n in out.graph.node if n.op_type == "Attention"):
        assert len(node.input) == 4 or not node.input[5]  # no attention_bias
        cast = producers[node.input[3]]
        assert cast.op_type == "Cast" and list(cast.input) == ["attention_mask"]
    assert {a["mask_filter_value"] for a in _attrs(out, "Attention")} == {float(np.finfo(np.float32).min)}
    assert "Sub" not in {n.op_type for n in out.graph.node}  # (1 - mask) · NEG is gone


@pytest.mark.parametrize("side", ["left", "right", "none"])
def test_encoder_attention_padding_numeric(side):
    model = cleaned("bert")
    out, _ = gm.apply_pass(FuseAttention(), model)
    feeds = gm.bert_example(batch=3, seq=9)
    feeds["attention_mask"][:] = 1
    if side == "left":
        feeds["attention_mask"][0, :4] = feeds["attention_mask"][2, :1] = 0
    elif side == "right":
        feeds["attention_mask"][0, 5:] = feeds["attention_mask"][2, 8:] = 0
    gm.assert_same_outputs(model, out, feeds)


def test_encoder_attention_refuses_a_row_broadcast_mask_it_cannot_read():
    """(2 - mask) · NEG is not a padding mask: the [B, 1, 1, S] bias cannot go to ORT's attention_bias
    (it needs [.., S, S]), so the layers stay unfused and say why."""
    model = cleaned("bert")
    sub = next(n for n in model.graph.node if n.op_type == "Sub")
    two = onnx.numpy_helper.from_array(np.array(2.0, np.float32), "two")
    model.graph.initializer.append(two)
    sub.input[0] = "two"
    _, report = gm.apply_pass(FuseAttention(), model)
    assert "Attention" not in report.counts
    assert any("not a 2-D padding mask" in d["reason"] for d in report.details)


@pytest.mark.parametrize(
    ("steps", "padding_mask"),
    [
        ([[1, 2]], True),  # one Unsqueeze
        ([[1], [2]], True),  # m[:, None] then [:, :, None]
        ([[1], [1]], True),  # m[:, None] twice
        ([[-3, -2]], True),  # negative axes count from the output's rank
        ([[2], [1]], False),  # m[:, :, None] then [:, None]: [B, 1, S, 1], a mask over query rows
        ([[3], [1]], False),
        ([[1]], False),
        ([None], False),  # axes not constant
    ],
)
def test_padding_mask_layout_follows_the_unsqueeze_order(steps, padding_mask):
    from graph_passes.fuse_attention import _unsqueezed

    arrays = [None if s is None else np.array(s, np.int64) for s in steps]
    assert (_unsqueezed(["batch", "key"], arrays) == ["batch", 1, 1, "key"]) is padding_mask
