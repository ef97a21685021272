"""Attention fusions pass by pass on the exported head-pruned models: exact counts, per-layer head counts,
the reason on a near-miss, idempotence, and outputs unchanged on ONNX Runtime (optimizations off)."""

from __future__ import annotations

import functools

import graph_models as gm
import onnx
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
