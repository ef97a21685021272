"""The INT4 CPU file's decode-graph fusions (exporter/quantize/int4_packed_gqa.py, int4_skip_norm.py) and the
widening of mixed packed groups, on the tiny pruned Llama / Qwen2 of tests/test_int4.py: the rewritten graph
computes what the unfused one does, in prefill and in decode, batch 2 with left padding."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from test_int4 import Decoder

from exporter.quantize import int4
from exporter.quantize.int4_packed_gqa import fuse_packed_gqa
from exporter.quantize.int4_padding_bias import simplify_attention_bias
from exporter.quantize.int4_prelude import compact_lengths
from exporter.quantize.int4_skip_norm import fuse_skip_norms
from exporter.quantize.int4_stage import PACKED_PROJECTIONS
from exporter.runtime.generation import CachedDecoder
from graph_passes.pack_matmuls import pack_matmuls

MAX_POSITIONS = 256  # the tiny model's max_position_embeddings


def _model(family: str):
    """Tiny seeded decoder with head size 16 (GroupQueryAttention's rotary needs a multiple of 16), FFN 100
    (not a multiple of the block), layer 1 pruned to one KV group of 2 query heads, layer 2 to 3 of 4."""
    import torch
    from test_decoder_export import FAMILIES, slice_heads

    config_cls, model_cls = FAMILIES[family]
    torch.manual_seed(0)
    config = config_cls(
        hidden_size=64,
        intermediate_size=100,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_hidden_layers=3,
        vocab_size=128,
        max_position_embeddings=MAX_POSITIONS,
        initializer_range=0.2,
        attn_implementation="eager",
    )
    model = model_cls(config).eval()
    slice_heads(model.model.layers[1].self_attn, [0], 2)
    slice_heads(model.model.layers[2].self_attn, [0, 1], 1)
    return model


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def decoder(request, tmp_path_factory):
    return Decoder(request.param, tmp_path_factory.mktemp(request.param), _model(request.param))


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _prefill_and_steps(model: onnx.ModelProto, steps: int = 4) -> list[np.ndarray]:
    """Logits of a left-padded batch-2 prefill (real tokens only) and of `steps` greedy decode steps."""
    rng = np.random.default_rng(3)
    ids = rng.integers(0, 128, size=(2, 9))
    mask = np.ones_like(ids)
    mask[1, :4] = 0
    decoder = CachedDecoder(_session(model))
    decoder.reset(2, mask)
    logits = decoder.forward(ids)
    out = [logits[mask.astype(bool)]]
    for _ in range(steps):
        logits = decoder.forward(logits[:, -1].argmax(-1)[:, None])
        out.append(logits)
    return out


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy


def test_packed_gqa_and_skip_norm_fusions_are_exact_in_fp32(decoder):
    packed = _copy(decoder.cpu)
    pack_matmuls(packed, PACKED_PROJECTIONS)
    before = _prefill_and_steps(packed)
    attentions = sum(n.op_type == "GroupQueryAttention" for n in packed.graph.node)
    fused = _copy(packed)
    n_gqa = fuse_packed_gqa(fused, MAX_POSITIONS)
    n_skip = fuse_skip_norms(fused)
    n_bias = simplify_attention_bias(fused, MAX_POSITIONS)
    ops = [n.op_type for n in fused.graph.node]
    assert n_bias == attentions  # transformers' mask is causal-and-padding: every attention rewired
    # Llama's q/k/v feed the rotary directly: every attention fuses; Qwen2's q/k/v biases sit between
    # the Split and the rotary, so the pattern does not hold there and nothing is rewritten.
    assert n_gqa == (attentions if decoder.family == "llama" else 0)
    assert ops.count("RotaryEmbedding") == 2 * (attentions - n_gqa)
    assert n_skip == ops.count("SkipSimplifiedLayerNormalization") > 0
    assert fuse_packed_gqa(fused, MAX_POSITIONS) == 0 and fuse_skip_norms(fused) == 0  # idempotent
    assert simplify_attention_bias(fused, MAX_POSITIONS) == attentions  # the new bias passes its own check
    for want, got in zip(before, _prefill_and_steps(fused), strict=True):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)


def test_compact_lengths_and_padding_bias_are_bit_exact(decoder):
    """The attention's length inputs from 3 shape reads (int4_prelude.py) and the padding bias sharing one of
    them: same logits bit for bit, prefill and decode steps of a left-padded batch of 2, fewer nodes."""
    packed = _copy(decoder.cpu)
    pack_matmuls(packed, PACKED_PROJECTIONS)
    fuse_packed_gqa(packed, MAX_POSITIONS)  # Llama: the rotary's own shape reads leave the graph
    fuse_skip_norms(packed)
    simplify_attention_bias(packed, MAX_POSITIONS)
    before = _prefill_and_steps(packed)
    attentions = sum(n.op_type == "GroupQueryAttention" for n in packed.graph.node)
    compact = _copy(packed)
    assert compact_lengths(compact) == attentions
    assert compact_lengths(compact) == 0  # already compact: nothing to do
    for want, got in zip(before, _prefill_and_steps(compact), strict=True):
        np.testing.assert_array_equal(got, want)
    prelude = {"Shape", "Expand", "Cast", "Squeeze", "Sub", "Slice", "Concat", "Equal", "Where", "Unsqueeze"}

    def live_prelude(model):  # what the file keeps once dead nodes are gone (as int4.cpu_model does)
        import onnx_ir as ir

        from graph_passes.remove_dead_nodes import RemoveDeadNodes

        ir_model = ir.from_proto(model)
        RemoveDeadNodes()(ir_model)
        return sum(n.op_type in prelude for n in ir.to_proto(ir_model).graph.node)

    if decoder.family == "llama":  # Qwen2's unfused rotary still reads the old shape nodes here
        assert live_prelude(compact) < live_prelude(packed)
    assert live_prelude(compact) <= live_prelude(packed)


def test_lengths_computed_otherwise_are_left_alone(decoder):
    """A length input that is not the shape arithmetic (here seqlens_k from the mask's row sums, a
    right-padding convention) fails the check: nothing is rewired."""
    model = _copy(decoder.cpu)
    simplify_attention_bias(model, MAX_POSITIONS)
    graph = model.graph
    graph.initializer.append(onnx.numpy_helper.from_array(np.array([1], np.int64), "rowsum_axes"))
    graph.initializer.append(onnx.numpy_helper.from_array(np.array(1, np.int64), "rowsum_one"))
    graph.node.insert(
        0, onnx.helper.make_node("ReduceSum", ["attention_mask", "rowsum_axes"], ["rowsum"], keepdims=0)
    )
    graph.node.insert(1, onnx.helper.make_node("Sub", ["rowsum", "rowsum_one"], ["rowsum_last"]))
    graph.node.insert(
        2, onnx.helper.make_node("Cast", ["rowsum_last"], ["rowsum_k"], to=onnx.TensorProto.INT32)
    )
    for node in graph.node:
        if node.op_type == "GroupQueryAttention":
            node.input[5] = "rowsum_k"
    nodes = len(graph.node)
    assert compact_lengths(model) == 0
    assert len(graph.node) == nodes


def test_gqa_fusion_alone_is_bit_exact_on_the_int4_file(decoder):
    """Packed query + the kernel's own rotary read the same rows as the RotaryEmbedding nodes did."""
    prepared = int4.prepare(decoder.cpu, decoder.sites, decoder.rows, method="awq")
    plain, _ = int4.cpu_model(decoder.cpu, prepared.plan({}), 4, PACKED_PROJECTIONS)
    fused = _copy(plain)
    fuse_packed_gqa(fused, MAX_POSITIONS)
    for want, got in zip(_prefill_and_steps(plain), _prefill_and_steps(fused), strict=True):
        np.testing.assert_array_equal(got, want)


def test_cpu_model_with_decode_fusions_keeps_the_quantized_function(decoder):
    """The INT4 file as the stage writes it: fused, fewer nodes, same numbers up to accuracy_level 4's int8
    rounding of activations (a skip-norm sum rounded once differently can flip one int8 code)."""
    prepared = int4.prepare(decoder.cpu, decoder.sites, decoder.rows, method="awq")
    plan = prepared.plan({})
    plain, _ = int4.cpu_model(decoder.cpu, plan, 4, PACKED_PROJECTIONS)
    fused, report = int4.cpu_model(
        decoder.cpu, plan, 4, PACKED_PROJECTIONS, decode_fusions=True, max_positions=MAX_POSITIONS
    )
    assert len(fused.graph.node) < len(plain.graph.node)
    assert report["counts"]["SkipSimplifiedLayerNormalization"] > 0
    assert not {"Cos", "Sin"} & {n.op_type for n in fused.graph.node} or decoder.family != "llama"
    cos = decoder.cosine(fused)
    assert cos == pytest.approx(decoder.cosine(plain), abs=2e-3)
    for want, got in zip(_prefill_and_steps(plain), _prefill_and_steps(fused), strict=True):
        cosine = (want * got).sum(-1) / (np.linalg.norm(want, axis=-1) * np.linalg.norm(got, axis=-1))
        assert cosine.min() > 0.995


def test_mixed_groups_are_widened_to_pack(decoder):
    k_proj = next(s.node for s in decoder.sites if "layers.0/self_attn/k_proj" in s.node)
    bits = int4.widen_mixed_groups(decoder.cpu, {k_proj: 8}, PACKED_PROJECTIONS)
    layer0 = {s.node for s in decoder.sites if "layers.0/self_attn/" in s.node and "o_proj" not in s.node}
    assert {n for n, b in bits.items() if b == 8} == layer0 and len(layer0) == 3
    prepared = int4.prepare(decoder.cpu, decoder.sites, decoder.rows, method="rtn")
    model, report = int4.cpu_model(decoder.cpu, prepared.plan(bits), 4, PACKED_PROJECTIONS)
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("Split") == 2 * 3  # every q/k/v and gate/up group packed, layer 0's at 8 bits
    assert report["counts"]["MatMulNBits_8bit"] == 1


def test_prefill_decode_pair_runs_each_file_as_itself(decoder, tmp_path):
    """exporter.runtime.generation: INT8 dynamic file for the prompt, INT4 file for the steps, one cache. The
    pair's prefill logits are the INT8 file's own, every step is the INT4 file's own on that cache, and the
    whole is within the INT4 gate of fp32 (logit cosine over prefill + forced decode steps)."""
    from exporter.quantize.cpu_int8 import build
    from exporter.runtime.generation import generate

    prepared = int4.prepare(decoder.cpu, decoder.sites, decoder.rows, method="awq")
    decode_model, _ = int4.cpu_model(
        decoder.cpu,
        prepared.plan({}),
        4,
        PACKED_PROJECTIONS,
        decode_fusions=True,
        max_positions=MAX_POSITIONS,
    )
    int8_path = build(decoder.cpu_path, tmp_path / "model.int8.cpu.onnx", frozenset())
    prefill, decode, fp32 = _session(onnx.load(str(int8_path))), _session(decode_model), _session(decoder.cpu)
    rng = np.random.default_rng(5)
    ids = rng.integers(0, 128, size=(2, 12))
    mask = np.ones_like(ids)
    mask[0, :3] = 0
    pair, alone, reference = CachedDecoder(decode, prefill), CachedDecoder(prefill), CachedDecoder(fp32)
    for d in (pair, alone, reference):
        d.reset(2, mask)
    got, want, ref = pair.forward(ids), alone.forward(ids), reference.forward(ids)
    np.testing.assert_array_equal(got, want)  # the prompt ran on the INT8 file
    cosines = [_cosines(ref[mask.astype(bool)], got[mask.astype(bool)])]
    steps = CachedDecoder(decode)
    steps.reset(2)
    steps._past, steps.attention_mask = dict(pair._past), pair.attention_mask  # the cache the pair holds
    for _ in range(6):
        token = ref[:, -1].argmax(-1)[:, None]  # fp32's tokens forced: the same work for every file
        got, want, ref = pair.forward(token), steps.forward(token), reference.forward(token)
        np.testing.assert_array_equal(got, want)  # each step ran on the INT4 file, on the pair's cache
        cosines.append(_cosines(ref[:, -1], got[:, -1]))
    assert np.concatenate(cosines).mean() >= 0.95
    tokens = generate(decode, ids[:1], max_new_tokens=5, prefill=prefill)
    assert tokens.shape == (1, 17)


def test_pair_with_another_cache_layout_is_an_input_error(decoder, tmp_path):
    from test_decoder_export import build_pruned_model

    from export_errors import InputError
    from exporter.export.decoder_with_past import export_decoder_with_past

    other = tmp_path / "other.onnx"
    export_decoder_with_past(build_pruned_model("llama"), other)  # 8 query / 4 KV heads of 8: not ours
    with pytest.raises(InputError, match=r"past_key_values\.0\.key.*share one cache layout"):
        CachedDecoder(_session(decoder.cpu), _session(onnx.load(str(other))))


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.reshape(-1, a.shape[-1]).astype(np.float64), b.reshape(-1, b.shape[-1]).astype(np.float64)
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def test_padding_bias_alone_is_bit_exact_and_refuses_other_masks(decoder):
    """The padding-only bias gives the very numbers of the exported mask (left-padded batch, prefill and
    decode); a mask that also hides a key the kernel keeps (here: a 3-token sliding window) is left alone."""
    prepared = int4.prepare(decoder.cpu, decoder.sites, decoder.rows, method="rtn")
    plain, _ = int4.cpu_model(decoder.cpu, prepared.plan({}), 4, PACKED_PROJECTIONS)
    fused = _copy(plain)
    assert simplify_attention_bias(fused, MAX_POSITIONS) > 0
    for want, got in zip(_prefill_and_steps(plain), _prefill_and_steps(fused), strict=True):
        np.testing.assert_array_equal(got, want)
    windowed = _copy(plain)
    bias = next(n.input[10] for n in windowed.graph.node if n.op_type == "GroupQueryAttention")
    _add_window(windowed, bias, 3)
    assert simplify_attention_bias(windowed, MAX_POSITIONS) == 0
    wide = _copy(plain)  # the same added subgraph with a window no position reaches: accepted
    _add_window(wide, bias, 10 * MAX_POSITIONS)
    assert simplify_attention_bias(wide, MAX_POSITIONS) > 0


def _add_window(model: onnx.ModelProto, bias: str, window: int) -> None:
    """bias += m where key t < query position - window (a sliding window the mask encodes)."""
    from onnx import helper, numpy_helper

    graph = model.graph
    banded = f"{bias}_window"
    for node in graph.node:
        if node.op_type == "GroupQueryAttention":
            node.input[10] = banded
    graph.initializer.append(numpy_helper.from_array(np.array(window, np.int64), "window"))
    graph.initializer.append(numpy_helper.from_array(np.array(-3.0e38, np.float32), "low"))
    graph.initializer.append(numpy_helper.from_array(np.array(0.0, np.float32), "zero"))
    graph.initializer.append(numpy_helper.from_array(np.array([-1], np.int64), "last"))
    nodes = [
        helper.make_node("Shape", [bias], ["b_shape"]),
        helper.make_node("Gather", ["b_shape", "last"], ["b_total"], axis=0),
        helper.make_node("ReduceSum", ["attention_mask"], ["unused"], keepdims=0),
        helper.make_node("Shape", ["input_ids"], ["ids_shape"]),
        helper.make_node("Gather", ["ids_shape", "last"], ["b_new"], axis=0),
        helper.make_node("Sub", ["b_total", "b_new"], ["b_past"]),
        helper.make_node("Squeeze", ["b_total"], ["t_total"]),
        helper.make_node("Squeeze", ["b_past"], ["t_past"]),
        helper.make_node("Range", ["zero_i", "t_total", "one_i"], ["keys"]),
        helper.make_node("Range", ["t_past", "t_total", "one_i"], ["queries"]),
        helper.make_node("Unsqueeze", ["queries", "last"], ["queries_col"]),
        helper.make_node("Sub", ["queries_col", "keys"], ["distance"]),
        helper.make_node("Greater", ["distance", "window"], ["far"]),
        helper.make_node("Where", ["far", "low", "zero"], ["band"]),
        helper.make_node("Add", [bias, "band"], [banded]),
    ]
    graph.initializer.append(numpy_helper.from_array(np.array(0, np.int64), "zero_i"))
    graph.initializer.append(numpy_helper.from_array(np.array(1, np.int64), "one_i"))
    position = max(i for i, n in enumerate(graph.node) if bias in n.output) + 1
    existing = list(graph.node)
    del graph.node[:]
    graph.node.extend([*existing[:position], *nodes, *existing[position:]])
