"""Whole-layer removal: a sublayer whose units are all dead leaves the graph.

A 3-layer Llama with layer 1's attention (every o_proj column) and layer 2's MLP (every down_proj
column) wholly masked, and a partly pruned layer 0; a 3-layer BERT with layer 0's attention (every head)
and layer 1's FFN (every intermediate row, so GELU(b1)·W2 must survive as a constant) wholly masked.
Both are exported through the whole pipeline (INT8 default, strict fusion) once per module. The
decoder is then checked against the *masked* reference (the uncompacted model, transformers' own
`generate` with its own cache): prefill of a left-padded batch + 16 cached decode steps <= 1e-4.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from test_real_checkpoints import STEPS, cached_logits, transformers_generation

from engines import bench_cli
from exporter import ExportConfig, export_engine
from exporter.export.decoder_with_past import DecoderManifest, LayerAttentionShape, tensorrt_profile
from exporter.model_dir.loader import build_reference_model, load_model_dir
from exporter.restructure.plan import RestructurePlan
from exporter.runtime.generation import generate
from exporter.testing.synthetic import column_mask, head_column_mask, layer_param, row_mask
from exporter.validate.tolerances import tolerance

TOL = tolerance("fp32").max_abs
CONFIG = ExportConfig(benchmark=False, strict_fusion=True, calibration_samples=32)


def matmuls(path, *scopes: str) -> list[str]:
    """MatMul / Gemm nodes whose name lies under one of `scopes` (TorchScript names nodes by module)."""
    graph = onnx.load(str(path)).graph
    return [
        n.name for n in graph.node if n.op_type in ("MatMul", "Gemm") and any(s in n.name for s in scopes)
    ]


@pytest.fixture(scope="module")
def llama_export(tmp_path_factory):
    masks = {
        layer_param("llama", 1, "o"): column_mask((64, 64), range(64)),  # every query head of layer 1
        layer_param("llama", 2, "down"): column_mask((64, 96), range(96)),  # every neuron of layer 2
        layer_param("llama", 0, "gate"): row_mask((96, 64), range(20)),
    }
    from exporter.testing.synthetic import write_model_dir

    src = write_model_dir(
        tmp_path_factory.mktemp("llama_dir"),
        "llama",
        masks=masks,
        tokenizer="llama3",
        config_overrides={"num_hidden_layers": 3},
    )
    return src, export_engine(src, tmp_path_factory.mktemp("llama_out") / "out", CONFIG)


def test_removed_sublayers_leave_the_decoder_graph(llama_export) -> None:
    _, result = llama_export
    manifest = json.loads((result.output_dir / "decoder_manifest.json").read_text())
    assert manifest["cache_layers"] == [0, 2] and manifest["layers"][1] is None
    for name in ("exported", "onnx", "int8", "int8_cpu"):
        model = onnx.load(str(result.artifacts[name]), load_external_data=False)
        inputs = [i.name for i in model.graph.input]
        outputs = [o.name for o in model.graph.output]
        assert [n for n in inputs if n.startswith("past_key_values.")] == [
            "past_key_values.0.key",
            "past_key_values.0.value",
            "past_key_values.2.key",
            "past_key_values.2.value",
        ], name
        assert not any(n.startswith("present.1.") for n in outputs), name
    exported = result.artifacts["exported"]
    assert matmuls(exported, "/layers.1/self_attn/", "/layers.2/mlp/") == []
    assert len(matmuls(exported, "/layers.2/self_attn/")) == 6  # q, k, v, o and the two attention products
    assert len(matmuls(exported, "/layers.1/mlp/")) == 3


def test_plan_and_report_say_what_is_gone_and_the_flops_saved(llama_export) -> None:
    _, result = llama_export
    plan = RestructurePlan.load(result.output_dir / "restructure_plan.json")
    assert plan.sublayers_removed() == {1: ["attention"], 2: ["mlp"]}
    hidden, heads, kv, head_dim, ffn = 64, 8, 4, 8, 96
    attention = {
        "fixed": 2 * hidden * head_dim * (2 * heads + 2 * kv),
        "per_context_token": 4 * heads * head_dim,
    }
    assert plan.layers[1].flops_saved_by_sublayer_removal == attention
    assert plan.layers[2].flops_saved_by_sublayer_removal == {
        "fixed": 2 * hidden * ffn * 3,
        "per_context_token": 0,
    }
    section = result.report["restructure"]
    assert section["sublayers_removed"] == {"1": ["attention"], "2": ["mlp"]}
    assert section["flops_saved_by_sublayer_removal"]["fixed"] == attention["fixed"] + 2 * hidden * ffn * 3
    markdown = (result.output_dir / "report.md").read_text()
    assert "Whole sublayers removed" in markdown and "layer 1: attention" in markdown


def test_strict_fusion_expects_no_attention_where_there_is_none(llama_export) -> None:
    _, result = llama_export
    rows = result.report["graph_passes"]["fusions"]
    attention = {row["layer"]: row["status"] for row in rows if row["fusion"] == "attention"}
    assert attention == {"0": "applied", "2": "applied"}


def test_cached_decoding_equals_the_masked_reference(llama_export) -> None:
    """The issue's "done when": prefill + 16 cached decode steps equal the masked (uncompacted)
    reference, on the exported graph, the fused graph, and as generated tokens."""
    src, result = llama_export
    reference = build_reference_model(load_model_dir(src))
    assert reference.model.layers[1].self_attn is not None  # the reference still computes the dead attention
    rng = np.random.default_rng(4)
    ids = rng.integers(0, reference.config.vocab_size, (2, 10), dtype=np.int64)
    mask = np.ones_like(ids)
    ids[1, :4], mask[1, :4] = 1, 0
    tokens, want = transformers_generation(reference, ids, mask)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    for name in ("exported", "onnx"):
        session = ort.InferenceSession(
            str(result.artifacts[name]), options, providers=["CPUExecutionProvider"]
        )
        for step, (got, ref) in enumerate(zip(cached_logits(session, ids, mask, tokens), want, strict=True)):
            error = float(np.abs(got - ref).max())
            assert error <= TOL, f"{name}: step {step} max abs logit error {error:.2e}"
        np.testing.assert_array_equal(
            generate(session, ids, max_new_tokens=STEPS, attention_mask=mask), tokens
        )


def test_int8_decodes_without_the_removed_cache(llama_export) -> None:
    _, result = llama_export
    cpu = result.report["int8"]["cpu"]
    assert cpu["greedy_agreement"] >= 0.5 and cpu["logit_mean_cosine"] >= 0.99
    session = ort.InferenceSession(str(result.artifacts["int8_cpu"]), providers=["CPUExecutionProvider"])
    out = generate(session, np.array([[5, 6, 7]], dtype=np.int64), max_new_tokens=4)
    assert out.shape == (1, 7)


def test_engine_bench_feeds_only_the_caches_there_are(llama_export, capsys) -> None:
    _, result = llama_export
    path = str(result.artifacts["onnx"])
    fast = ["--warmUp=5", "--duration=0", "--iterations=5", "--avgRuns=5"]
    code = bench_cli.main([path, *fast, "--shapes=input_ids:1x1,past_key_values.2.key:1x4x16x8"])
    out = capsys.readouterr().out
    assert code == 0 and "past_key_values.0.value:1x4x16x8" in out and "past_key_values.1" not in out, out


def test_tensorrt_profile_has_no_past_for_a_layer_without_attention() -> None:
    shape = LayerAttentionShape(n_q=8, n_kv=4, head_dim=8)
    manifest = DecoderManifest(
        layers=(shape, None, shape),
        input_names=(),
        output_names=(),
        dynamic_axes={},
        vocab_size=128,
        dtype="float32",
        opset=17,
        model_type="llama",
    )
    assert manifest.cache_layers == (0, 2) and manifest.to_dict()["layers"][1] is None
    profile = tensorrt_profile(manifest, max_batch=2, max_prompt=16, max_total=32)
    pasts = sorted(name for name in profile["max"] if name.startswith("past_key_values."))
    assert pasts == [f"past_key_values.{i}.{kv}" for i in (0, 2) for kv in ("key", "value")]
    with pytest.raises(Exception, match="no KV cache"):
        manifest.past_shape(1, 1, 4)


# ------------------------------------------------------------------------------------------------- BERT


@pytest.fixture(scope="module")
def bert_export(tmp_path_factory):
    from exporter.testing.synthetic import write_model_dir

    masks = {
        layer_param("bert", 0, "o"): head_column_mask((64, 64), range(4), 16),  # every head of layer 0
        layer_param("bert", 1, "up"): row_mask((128, 64), range(128)),  # every neuron: GELU(b1)·W2 constant
        layer_param("bert", 2, "up"): row_mask((128, 64), range(30)),
    }
    src = write_model_dir(
        tmp_path_factory.mktemp("bert_dir"),
        "bert",
        masks=masks,
        tokenizer=True,
        config_overrides={"num_hidden_layers": 3},
    )
    return src, export_engine(src, tmp_path_factory.mktemp("bert_out") / "out", CONFIG)


def test_bert_keeps_only_what_the_layernorm_needs(bert_export) -> None:
    _, result = bert_export
    plan = RestructurePlan.load(result.output_dir / "restructure_plan.json")
    assert plan.sublayers_removed() == {0: ["attention"], 1: ["mlp"]}
    exported = result.artifacts["exported"]
    assert matmuls(exported, "/layer.0/attention/", "/layer.1/intermediate/", "/layer.1/output/") == []
    graph = onnx.load(str(exported)).graph
    norms = [n.name for n in graph.node if n.op_type == "LayerNormalization"]
    assert any("/layer.0/attention/output/LayerNorm" in n for n in norms)
    assert any("/layer.1/output/LayerNorm" in n for n in norms)
    for stage in ("compact_pytorch", "onnx_fp32", "optimized_fp32"):
        assert result.report["validation"][stage][0]["max_abs"] <= TOL, stage
    assert result.report["validation"]["int8_cpu"][0]["mean_cosine"] >= 0.99


def test_bert_removed_sublayer_constants_fold_into_the_previous_layernorm(bert_export) -> None:
    """LayerNorm(h + c) with h read by nothing else: c moves into h's LayerNorm beta, the Add goes."""
    _, result = bert_export
    fold = next(p for p in result.report["graph_passes"]["passes"] if p["name"] == "fold-residual-bias")
    assert fold["counts"]["folded"] == 6  # 4 projection biases of the sublayers kept + the 2 constants
    rows = result.report["graph_passes"]["fusions"]
    attention = {row["layer"]: row["status"] for row in rows if row["fusion"] == "attention"}
    gelu = {row["layer"]: row["status"] for row in rows if row["fusion"] == "gelu"}
    assert attention == {"1": "applied", "2": "applied"} and gelu == {"0": "applied", "2": "applied"}


def test_bert_removed_sublayers_match_the_masked_reference(bert_export) -> None:
    src, result = bert_export
    reference = build_reference_model(load_model_dir(src))
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    with torch.no_grad():
        want = reference(input_ids=ids, attention_mask=mask).last_hidden_state.numpy()
    session = ort.InferenceSession(str(result.artifacts["onnx"]), providers=["CPUExecutionProvider"])
    feeds = {
        "input_ids": ids.numpy(),
        "attention_mask": mask.numpy(),
        "token_type_ids": np.zeros_like(ids.numpy()),
    }
    got = session.run(["last_hidden_state"], feeds)[0]
    real = mask.numpy().astype(bool)
    assert np.abs(got - want)[real].max() <= TOL


# ------------------------------------------------------------------------------ decoder edge cases


def qwen2_with_dead_attention(layers: list[int]):  # type: ignore[no-untyped-def]
    """(masked reference, compact copy): every KV head's value rows zero in `layers`, so each of those
    attentions outputs the constant W_o·b_v (qwen2 has value biases), kept as a residual bias."""
    import copy

    from exporter.restructure.remove_dead import restructure
    from exporter.testing.synthetic import broadcast_mask, build_base_model, head_row_mask

    model = build_base_model("qwen2", seed=1)
    with torch.no_grad():
        for layer in layers:
            value = model.get_parameter(layer_param("qwen2", layer, "v"))
            value.mul_(broadcast_mask(head_row_mask((32, 64), range(4), 8), value.shape))
    compact = copy.deepcopy(model)
    restructure(compact)
    return model, compact


def test_first_layer_without_attention_keeps_its_constant_and_decodes_exactly(tmp_path) -> None:
    """Layer 0 gone: the cache starts at layer 1 (mask sizes come from the first cache slot), and the
    removed attention's constant output reaches the residual."""
    from exporter.export.decoder_with_past import export_decoder_with_past

    reference, compact = qwen2_with_dead_attention([0])
    assert compact.model.layers[0].attn_residual_bias is not None
    manifest = export_decoder_with_past(compact, tmp_path / "decoder.onnx")
    assert manifest.cache_layers == (1,)
    ids = np.random.default_rng(0).integers(0, 128, (2, 6), dtype=np.int64)
    mask = np.ones_like(ids)
    ids[0, :2], mask[0, :2] = 0, 0
    tokens, want = transformers_generation(reference, ids, mask)
    session = ort.InferenceSession(str(tmp_path / "decoder.onnx"), providers=["CPUExecutionProvider"])
    for step, (got, ref) in enumerate(zip(cached_logits(session, ids, mask, tokens), want, strict=True)):
        assert float(np.abs(got - ref).max()) <= TOL, f"step {step}"


def test_a_decoder_without_any_attention_left_is_refused(tmp_path) -> None:
    from export_errors import InputError
    from exporter.export.decoder_with_past import export_decoder_with_past

    _, compact = qwen2_with_dead_attention([0, 1])
    with pytest.raises(InputError, match="no attention left"):
        export_decoder_with_past(compact, tmp_path / "decoder.onnx")
