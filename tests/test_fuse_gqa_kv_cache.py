"""GroupQueryAttention fusion on the KV-cache decoder graph (graph_passes/fuse_gqa_kv_cache.py).

Test models: the tiny Llama-GQA and Qwen2 of test_decoder_export.py, pruned per layer to
(8 q, 4 kv), (6 q, 3 kv: lost KV group 1), (4 q, 4 kv), exported with `export_decoder_with_past`
and cleaned. "Unfused" is that cleaned graph, "fused" the same after the pass; both run on ONNX
Runtime with its graph optimizations off. Left-padded batches are compared on real tokens only:
query rows that are entirely padding attend to nothing, and HF's softmax then averages every key
while the kernel's causal mask averages the keys up to the row; those rows and the cache entries
computed from them are padding, masked out of every later step.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from graph_models import apply_pass, op_histogram
from test_decoder_export import build_pruned_model
from test_generation import prompts, torch_greedy

from exporter.export.decoder_with_past import (
    example_feeds,
    export_decoder_with_past,
    layer_attention_shapes,
    positions_from_mask,
)
from exporter.runtime.generation import generate
from exporter.validate.tolerances import tolerance
from graph_passes.fuse_gqa_kv_cache import FuseGroupQueryAttentionKvCache
from graph_passes.pipeline import FusionNotAppliedError, optimize

HEADS = [(8, 4), (6, 3), (4, 4)]  # (q, kv) heads per layer as pruned by test_decoder_export.PRUNING
PROMPT, DECODE_STEPS = 6, 10


@dataclasses.dataclass
class Case:
    family: str
    model: torch.nn.Module
    exported: onnx.ModelProto
    unfused: onnx.ModelProto
    fused: onnx.ModelProto
    counts: dict[str, int]
    pipelined: onnx.ModelProto  # the whole onnxruntime pipeline, strict fusion
    fusions: list[dict]


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def case(request, tmp_path_factory) -> Case:
    model = build_pruned_model(request.param, seed=1)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    path = tmp_path_factory.mktemp(request.param) / "decoder_model.onnx"
    manifest = export_decoder_with_past(model, path)
    assert [(layer.n_q, layer.n_kv) for layer in manifest.layers] == HEADS
    exported = onnx.load(str(path))
    unfused, _ = optimize(exported, "onnxruntime", stages=("cleanup",), family=request.param)
    fused, report = apply_pass(FuseGroupQueryAttentionKvCache(), unfused)
    pipelined, pipeline = optimize(exported, "onnxruntime", family=request.param, strict_fusion=True)
    return Case(request.param, model, exported, unfused, fused, report.counts, pipelined, pipeline.fusions)


def session(model: onnx.ModelProto) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def assert_close(got: np.ndarray, want: np.ndarray, what: str, valid: np.ndarray | None = None) -> None:
    """Max abs error <= the fp32 tolerance, over the entries where `valid` (broadcast) is True."""
    error = np.abs(got.astype(np.float64) - want.astype(np.float64))
    if valid is not None:
        error = np.where(valid, error, 0.0)
    where = np.unravel_index(int(error.argmax()), error.shape)
    assert error.max() <= tolerance("fp32").max_abs, (
        f"{what}: max abs error {error.max():.3e} at {where} (fused {got[where]}, unfused {want[where]})"
    )


def gqa_attributes(model: onnx.ModelProto) -> list[dict]:
    return [
        {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
        for n in model.graph.node
        if n.op_type == "GroupQueryAttention"
    ]


def test_one_gqa_per_layer_with_the_layers_own_heads(case):
    ops = op_histogram(case.fused)
    assert ops["GroupQueryAttention"] == 3 and "Softmax" not in ops, ops
    assert case.counts["applied"] == 3 and case.counts["Softmax"] == -3
    attrs = gqa_attributes(case.fused)
    assert [(a["num_heads"], a["kv_num_heads"]) for a in attrs] == HEADS
    assert all(a["do_rotary"] == 0 and "causal" not in a for a in attrs)
    assert [o.name for o in case.fused.graph.output] == [o.name for o in case.unfused.graph.output]
    presents = {o for n in case.fused.graph.node if n.op_type == "GroupQueryAttention" for o in n.output[1:]}
    assert presents == {f"present.{i}.{kv}" for i in range(3) for kv in ("key", "value")}


def test_rotary_becomes_two_kernels_per_layer_fed_by_one_shared_table(case):
    """q and k each go through com.microsoft.RotaryEmbedding (num_heads = the layer's own); the rotate_half
    arithmetic and the Q/K transposes leave the graph; after CSE every layer reads one cos/sin cache and
    one position-id tensor (the graph's per-token rows, computed once from position_ids)."""
    ops = op_histogram(case.pipelined)
    assert ops["RotaryEmbedding"] == 6 and "Neg" not in ops, ops
    nodes = [n for n in case.pipelined.graph.node if n.op_type == "RotaryEmbedding"]
    heads = [a.i for n in nodes for a in n.attribute if a.name == "num_heads"]
    assert sorted(heads) == sorted(n for q, kv in HEADS for n in (q, kv))
    assert len({tuple(n.input[1:]) for n in nodes}) == 1
    assert ops.get("Transpose", 0) == 0, ops


def test_lengths_are_computed_once_for_all_layers(case):
    """seqlens_k / total / query_seqlens come from input_ids and attention_mask: after the pipeline's
    common-subexpression elimination every layer's GroupQueryAttention reads the same three values."""
    nodes = [n for n in case.pipelined.graph.node if n.op_type == "GroupQueryAttention"]
    assert len({tuple(n.input[i] for i in (5, 6, 16)) for n in nodes}) == 1


def run_both(case: Case, tokens: np.ndarray, mask: np.ndarray) -> None:
    """Prefill PROMPT tokens, then decode one token at a time, each graph on its own cache; logits and
    presents compared at every step on real tokens (mask == 1) only."""
    sessions = {"unfused": session(case.unfused), "fused": session(case.fused)}
    empty = example_feeds(layer_attention_shapes(case.model), 128, tokens.shape[0], past=0, seq=1)
    pasts = {name: {k: v for k, v in empty.items() if k.startswith("past_")} for name in sessions}
    names = [o.name for o in case.unfused.graph.output]
    steps = [(0, PROMPT)] + [(t, t + 1) for t in range(PROMPT, tokens.shape[1])]
    for step, (start, end) in enumerate(steps):
        feeds = {
            "input_ids": tokens[:, start:end],
            "attention_mask": mask[:, :end],
            "position_ids": positions_from_mask(mask[:, :end], end - start),
        }
        out = {name: dict(zip(names, s.run(None, feeds | pasts[name]))) for name, s in sessions.items()}
        real = mask[:, :end].astype(bool)
        assert_close(
            out["fused"]["logits"],
            out["unfused"]["logits"],
            f"logits at step {step}",
            real[:, start:end, None],
        )
        for past in pasts["fused"]:
            present = past.replace("past_key_values", "present")
            assert_close(
                out["fused"][present],
                out["unfused"][present],
                f"{present} at step {step}",
                real[:, None, :, None],
            )
            for name in sessions:
                pasts[name][past] = out[name][present]


def test_cached_decoding_equals_unfused_batch_1(case):
    tokens = prompts(1, PROMPT + DECODE_STEPS, seed=3)
    run_both(case, tokens, np.ones_like(tokens))


def test_cached_decoding_equals_unfused_left_padded_batch_2(case):
    tokens = prompts(2, PROMPT + DECODE_STEPS, seed=4)
    mask = np.ones_like(tokens)
    mask[0, :3] = 0  # row 0: three pad tokens on the left of its prompt
    run_both(case, tokens, mask)


def test_multi_token_step_with_past_in_a_batch(case):
    """Batch 3, 5 cached + 3 new tokens (chunked prefill / speculative decoding): the kernel refuses this
    without `query_seqlens` ("batch_size must be 1 when sequence_length > 1 and past context")."""
    feeds = example_feeds(layer_attention_shapes(case.model), 128, batch=3, past=5, seq=3, seed=2)
    names = [o.name for o in case.unfused.graph.output]
    for name, want, got in zip(
        names, session(case.unfused).run(None, feeds), session(case.fused).run(None, feeds)
    ):
        assert_close(got, want, name)  # the one pad token (row 0, position 0) is in the past: all rows real


def test_lengths_from_each_layer_without_the_named_inputs(case):
    """A graph whose token input has another name: batch / new / total lengths come from each layer's
    own q projection and past instead of input_ids / attention_mask; still equal on real tokens."""
    renamed = onnx.ModelProto()
    renamed.CopyFrom(case.unfused)
    for node in renamed.graph.node:
        node.input[:] = ["token_ids" if i == "input_ids" else i for i in node.input]
    next(i for i in renamed.graph.input if i.name == "input_ids").name = "token_ids"
    fused, report = apply_pass(FuseGroupQueryAttentionKvCache(), renamed)
    assert report.counts["GroupQueryAttention"] == 3
    assert sum(n.op_type == "Shape" and n.input[0] == "attention_mask" for n in fused.graph.node) == 0
    unfused_session, fused_session = session(renamed), session(fused)
    feeds = example_feeds(layer_attention_shapes(case.model), 128, batch=2, past=4, seq=3, seed=5)
    feeds["token_ids"] = feeds.pop("input_ids")
    names = [o.name for o in renamed.graph.output]
    for name, want, got in zip(names, unfused_session.run(None, feeds), fused_session.run(None, feeds)):
        assert_close(got, want, name)


@pytest.mark.parametrize("batch", [1, 2])
def test_fused_greedy_equals_torch_generate(case, batch):
    prompt = prompts(batch, 7)
    mask = np.ones_like(prompt)
    mask[1:, :2] = 0  # batch 2: the second row is left-padded
    want = torch_greedy(case.model, prompt, 16, attention_mask=torch.from_numpy(mask))
    got = generate(session(case.fused), prompt, max_new_tokens=16, attention_mask=mask)
    mismatch = np.argwhere(got != want)
    assert mismatch.size == 0, f"first mismatch (row, position) {mismatch[0]}: {got} vs {want}"
    assert len(np.unique(got[:, 7:])) > 3, "degenerate test model: greedy repeats one token"


def test_pipeline_expects_and_applies_gqa_on_onnxruntime_only(case):
    rows = [r for r in case.fusions if r["fusion"] == "attention"]
    assert [(r["layer"], r["status"]) for r in rows] == [(str(i), "applied") for i in range(3)]
    _, trt = optimize(case.exported, "tensorrt", family=case.family, strict_fusion=True)
    rows = [r for r in trt.fusions if r["fusion"] == "attention"]
    assert len(rows) == 3 and all(r["status"] == "not_applicable" and "opset 17" in r["reason"] for r in rows)


def test_idempotent(case):
    twice, report = apply_pass(FuseGroupQueryAttentionKvCache(), case.fused)
    assert report.counts == {}
    assert op_histogram(twice) == op_histogram(case.fused)


def _layer_softmax_input(model: onnx.ModelProto, layer: int) -> onnx.NodeProto:
    """The `scores · scale` Mul of `layer` (Mul -> Add mask -> Softmax)."""
    producers = {o: n for n in model.graph.node for o in n.output}
    softmax = next(n for n in model.graph.node if n.op_type == "Softmax" and f"layers.{layer}/" in n.name)
    return producers[producers[softmax.input[0]].input[0]]


def test_non_constant_scale_is_refused_with_a_reason(case):
    model = onnx.ModelProto()
    model.CopyFrom(case.unfused)
    _layer_softmax_input(model, 1).input[1] = "dynamic_scale"
    model.graph.input.append(onnx.helper.make_tensor_value_info("dynamic_scale", onnx.TensorProto.FLOAT, []))
    out, report = apply_pass(FuseGroupQueryAttentionKvCache(), model)
    assert report.counts["GroupQueryAttention"] == 2 and op_histogram(out)["Softmax"] == 1
    reasons = [d["reason"] for d in report.details if d["layer"] == "1"]
    assert any("scale is not a constant" in r for r in reasons), reasons
    with pytest.raises(FusionNotAppliedError, match=r"attention in layer 1: 0/1 .*scale is not a constant"):
        optimize(model, "onnxruntime", stages=("fusion",), family=case.family, strict_fusion=True)


def test_past_with_other_head_count_than_the_projections_is_refused(case):
    """Layer 0's past declared with 2 KV heads while k_proj gives 4: GQA would read the wrong cache."""
    model = onnx.ModelProto()
    model.CopyFrom(case.unfused)
    past = next(i for i in model.graph.input if i.name == "past_key_values.0.key")
    past.type.tensor_type.shape.dim[1].dim_value = 2
    _, report = apply_pass(FuseGroupQueryAttentionKvCache(), model)
    assert report.counts["GroupQueryAttention"] == 2
    reasons = [d["reason"] for d in report.details if d["layer"] == "0"]
    assert any("past_key_values.0.key has shape" in r and "[batch, 4, past, 8]" in r for r in reasons), (
        reasons
    )


def test_export_engine_default_task_fuses_attention_per_layer(model_dir_factory, tmp_path):
    """The export flow: default task (text-generation-with-past) on a tiny Llama that lost a KV group."""
    from exporter.api import export_engine
    from exporter.config import ExportConfig
    from exporter.testing.synthetic import gqa_group_masks, tiny_config

    masks = gqa_group_masks(tiny_config("llama"), "llama", 1, 2)
    config = ExportConfig(precision="fp32", benchmark=False, sequence_length=32, validation_samples=4)
    result = export_engine(model_dir_factory("llama", masks=masks), tmp_path / "out", config)
    passes = result.report["graph_passes"]
    assert (
        result.report["export"]["task"] == "text-generation-with-past" and passes["target"] == "onnxruntime"
    )
    rows = [(r["layer"], r["status"]) for r in passes["fusions"] if r["fusion"] == "attention"]
    assert rows == [("0", "applied"), ("1", "applied")]
    ops = op_histogram(onnx.load(result.onnx_path))
    assert ops["GroupQueryAttention"] == 2 and "Softmax" not in ops
    assert all(
        c["max_abs"] <= tolerance("fp32").max_abs for c in result.report["validation"]["optimized_fp32"]
    )
