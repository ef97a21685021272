"""Streaming export (exporter/export/streaming): one decoder layer at a time from the safetensors shards.

Checked against the whole-model path on tiny Llama / Qwen2 / Mistral folders (bf16 shards, masks including
a wholly masked attention and a wholly masked MLP): same inputs and outputs (names, order, shapes), and the
same logits (<= 1e-5) on a prefill and a cached decode step, for the exported graph, the graph after the
passes and the INT8 files. The per-layer LoRA merge equals PEFT's whole-model merge for LoRA, rsLoRA, DoRA
and rank/alpha patterns.
"""

from __future__ import annotations

import json
import re

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from export_errors import InputError, ValidationError
from exporter import ExportConfig, export_engine
from exporter.export.decoder_with_past import LayerAttentionShape, example_feeds
from exporter.export.streaming import choose
from exporter.export.streaming.layer_source import LayerSource
from exporter.model_dir.lazy_weights import read_lazy_weights
from exporter.model_dir.loader import build_reference_model, load_model_dir
from exporter.testing.synthetic import (
    LoraSpec,
    column_mask,
    layer_param,
    row_mask,
    tiny_config,
    write_model_dir,
)

EQUAL = 1e-5
THREE = {"num_hidden_layers": 3}
FP32 = dict(precision="fp32", benchmark=False, strict_fusion=True)


def _masks(family: str) -> dict[str, torch.Tensor]:
    return {
        layer_param(family, 1, "o"): column_mask((64, 64), range(64)),  # layer 1: attention wholly masked
        layer_param(family, 2, "down"): column_mask((64, 96), range(96)),  # layer 2: MLP wholly masked
        layer_param(family, 0, "gate"): row_mask((96, 64), range(20)),
    }


def _layers(out) -> tuple[LayerAttentionShape | None, ...]:  # type: ignore[no-untyped-def]
    manifest = json.loads((out / "decoder_manifest.json").read_text())
    return tuple(None if x is None else LayerAttentionShape(**x) for x in manifest["layers"])


def _assert_same_decoder(whole, streamed, vocab: int, manifest_dir=None) -> None:  # type: ignore[no-untyped-def]
    a = ort.InferenceSession(str(whole), providers=["CPUExecutionProvider"])
    b = ort.InferenceSession(str(streamed), providers=["CPUExecutionProvider"])
    assert [(i.name, i.shape) for i in a.get_inputs()] == [(i.name, i.shape) for i in b.get_inputs()]
    assert [(o.name, o.shape) for o in a.get_outputs()] == [(o.name, o.shape) for o in b.get_outputs()]
    layers = _layers(manifest_dir or whole.parent)
    for batch, past, seq in ((1, 0, 5), (3, 6, 1), (2, 4, 3)):
        feeds = example_feeds(layers, vocab, batch, past, seq, seed=3)
        for name, x, y in zip([o.name for o in a.get_outputs()], a.run(None, feeds), b.run(None, feeds)):
            assert x.shape == y.shape, name
            assert float(np.abs(x - y).max()) <= EQUAL, (name, batch, past, seq)


@pytest.fixture(scope="module", params=["llama", "qwen2", "mistral"])
def exports(request, tmp_path_factory):
    family = request.param
    overrides = {"num_hidden_layers": 3}
    if family == "mistral":
        overrides["sliding_window"] = 4  # shorter than the test sequences: the window is exercised
    src = write_model_dir(
        tmp_path_factory.mktemp(f"{family}_dir"),
        family,
        masks=_masks(family),
        tokenizer="llama3" if family != "qwen2" else False,  # qwen2: random token feeds
        config_overrides=overrides,
        shards=2,
        dtype=torch.bfloat16,
        generation_config=True,
    )
    whole = export_engine(
        src, tmp_path_factory.mktemp("whole") / "out", ExportConfig(streaming="off", **FP32)
    )
    streamed = export_engine(
        src, tmp_path_factory.mktemp("streamed") / "out", ExportConfig(streaming="on", **FP32)
    )
    return family, src, whole, streamed


def test_streamed_equals_whole_model_export(exports):
    _family, src, whole, streamed = exports
    assert "streaming" in streamed.report and "streaming" not in whole.report
    vocab = json.loads((src / "config.json").read_text())["vocab_size"]
    for artifact in ("exported", "onnx"):
        _assert_same_decoder(whole.artifacts[artifact], streamed.artifacts[artifact], vocab)
    passes = streamed.report["graph_passes"], whole.report["graph_passes"]
    assert passes[0]["fusions_missed"] == passes[1]["fusions_missed"] == 0
    assert passes[0]["fusions"] == passes[1]["fusions"]
    assert passes[0]["op_counts_after"] == passes[1]["op_counts_after"]


def test_streamed_removes_whole_sublayers(exports):
    _, _, whole, streamed = exports
    manifest = json.loads((streamed.output_dir / "decoder_manifest.json").read_text())
    assert manifest["cache_layers"] == [0, 2]  # layer 1's attention is gone: one fewer KV pair
    graph = onnx.load(str(streamed.artifacts["exported"]), load_external_data=False).graph
    names = [n.name for n in graph.node if n.op_type == "MatMul"]
    assert not [n for n in names if "/layers.1/self_attn/" in n]
    assert not [n for n in names if "/layers.2/mlp/" in n]
    assert [n for n in names if "/layers.0/self_attn/" in n] and [n for n in names if "/layers.1/mlp/" in n]
    assert (
        streamed.report["restructure"]["sublayers_removed"]
        == whole.report["restructure"]["sublayers_removed"]
    )
    assert streamed.report["restructure"]["params_after"] == whole.report["restructure"]["params_after"]
    for check in ("onnx_fp32", "optimized_fp32"):
        assert streamed.report["validation"][check][0]["max_abs"] <= 1e-4


def test_streamed_int8_equals_whole_model_int8(tmp_path):
    src = write_model_dir(
        tmp_path / "src",
        "llama",
        masks=_masks("llama"),
        tokenizer="llama3",
        config_overrides={"num_hidden_layers": 3},
    )
    config = dict(precision="int8", benchmark=False, calibration_samples=16)
    whole = export_engine(src, tmp_path / "whole", ExportConfig(streaming="off", **config))
    streamed = export_engine(src, tmp_path / "streamed", ExportConfig(streaming="on", **config))
    vocab = json.loads((src / "config.json").read_text())["vocab_size"]
    for artifact in ("int8", "int8_cpu"):
        _assert_same_decoder(whole.artifacts[artifact], streamed.artifacts[artifact], vocab)


LORAS = {
    "lora": LoraSpec(target_modules=("q_proj", "v_proj", "down_proj")),
    "rslora": LoraSpec(target_modules=("q_proj", "k_proj", "up_proj"), use_rslora=True, r=8, lora_alpha=4),
    "dora": LoraSpec(target_modules=("q_proj", "o_proj", "gate_proj"), use_dora=True),
    "patterns": LoraSpec(
        target_modules=("q_proj", "v_proj", "gate_proj"),
        rank_pattern={"model.layers.1.self_attn.q_proj": 2, "gate_proj": 6},
        alpha_pattern={"v_proj": 3},
    ),
}


@pytest.mark.parametrize("kind", sorted(LORAS))
def test_streamed_lora_merge_equals_peft(tmp_path, kind):
    src = write_model_dir(
        tmp_path / "src",
        "llama",
        lora=LORAS[kind],
        masks=_masks("llama"),
        dtype=torch.bfloat16,
        config_overrides=THREE,
    )
    whole = build_reference_model(load_model_dir(src)).state_dict()
    source = LayerSource(load_model_dir(src, lazy=True))
    for index in range(source.num_layers):
        layer = source.layer(index).state_dict()
        assert layer, index
        for name, tensor in layer.items():
            want = whole[f"model.layers.{index}.{name}"]
            assert torch.allclose(tensor, want, rtol=0, atol=1e-6), (kind, index, name)
    merge = source.lora_merge()
    assert merge is not None and len(merge.merged_modules) == source.num_layers * len(
        LORAS[kind].target_modules
    )


def test_lazy_weights_keep_checkpoint_dtype_and_zero_masks(tmp_path):
    src = write_model_dir(
        tmp_path / "src",
        "llama",
        masks=_masks("llama"),
        mask_form="zeros",
        dtype=torch.bfloat16,
        shards=3,
        config_overrides=THREE,
    )
    tensors, _ = read_lazy_weights(src)
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    whole = build_reference_model(load_model_dir(src)).state_dict()
    source = LayerSource(load_model_dir(src, lazy=True))
    for index in range(source.num_layers):
        for name, tensor in source.layer(index).state_dict().items():
            assert torch.equal(tensor, whole[f"model.layers.{index}.{name}"])


def test_auto_streams_above_the_threshold(tmp_path, monkeypatch):
    src = write_model_dir(tmp_path / "src", "llama", tokenizer="llama3")
    assert not choose.use_streaming("auto", True, src, "text-generation-with-past")
    assert choose.small_for_auto("auto", src) and not choose.small_for_auto("on", src)
    monkeypatch.setattr(choose, "THRESHOLD_BYTES", 0)
    assert choose.use_streaming("auto", True, src, "text-generation-with-past")
    assert not choose.small_for_auto("auto", src)
    result = export_engine(src, tmp_path / "out", ExportConfig(**FP32))
    assert result.report["export"]["streaming"] is True


def test_streaming_on_refuses_models_without_a_kv_cache(tmp_path):
    src = write_model_dir(tmp_path / "src", "bert", tokenizer=True)
    with pytest.raises(InputError, match="--streaming"):
        export_engine(src, tmp_path / "out", ExportConfig(streaming="on", **FP32))


def test_over_the_whole_file_budget_checks_pieces_only(tmp_path, monkeypatch):
    """Above WHOLE_FILE_CHECK_BYTES the files are not loaded whole: the pieces' checks stand, and the
    graph passes still run (onnx-ir, weights read lazily) and write a model.onnx equal to the small path's."""
    import exporter.api

    src = write_model_dir(
        tmp_path / "src", "llama", tokenizer="llama3", masks=_masks("llama"), config_overrides=THREE
    )
    small = export_engine(src, tmp_path / "small", ExportConfig(streaming="on", **FP32))
    monkeypatch.setattr(exporter.api, "WHOLE_FILE_CHECK_BYTES", 0)
    large = export_engine(src, tmp_path / "large", ExportConfig(streaming="on", **FP32))
    assert large.report["streaming"]["not_checked_whole"] == ["onnx_fp32", "optimized_fp32"]
    assert large.report["streaming"]["checks_max_abs"]["onnx_vs_pytorch_piece"] <= 1e-4
    assert "cpu_engine" not in large.report["timings_s"]
    vocab = json.loads((src / "config.json").read_text())["vocab_size"]
    _assert_same_decoder(small.artifacts["onnx"], large.artifacts["onnx"], vocab)


def test_masked_tables_take_the_in_memory_path(tmp_path):
    """Masked embedding / LM head tables are not streamed as stored: the pieces are built and masked in fp32
    like layers (LoRA merged on the layers), and the export still equals the whole-model one."""
    masks = {
        **_masks("llama"),
        "model.embed_tokens.weight": row_mask((128, 64), range(0, 128, 3)),
        "lm_head.weight": row_mask((128, 64), range(1, 128, 5)),
    }
    src = write_model_dir(
        tmp_path / "src",
        "llama",
        masks=masks,
        lora=LoraSpec(target_modules=("q_proj", "v_proj")),
        config_overrides=THREE,
        dtype=torch.bfloat16,
    )
    source = LayerSource(load_model_dir(src, lazy=True))
    assert (
        source.plain_table("model.embed_tokens.weight") is None
        and source.plain_table("lm_head.weight") is None
    )
    whole = export_engine(src, tmp_path / "whole", ExportConfig(streaming="off", **FP32))
    streamed = export_engine(src, tmp_path / "streamed", ExportConfig(streaming="on", **FP32))
    assert streamed.report["model"]["lora_merged_modules"] == whole.report["model"]["lora_merged_modules"]
    _assert_same_decoder(whole.artifacts["exported"], streamed.artifacts["exported"], 128)


def test_report_gives_peak_memory_per_stage(exports):
    _, _, whole, streamed = exports
    for result in (whole, streamed):
        peaks = result.report["peak_rss_gib"]
        assert set(result.report["timings_s"]) <= set(peaks)
        assert all(p is None or p > 0 for p in peaks.values())


def test_streaming_refuses_what_it_cannot_carry(tmp_path):
    """Nothing dropped silently on the streamed path: a modules_to_save head in the adapter, and a NaN in a
    checkpoint tensor (read only when its layer is built), are one-line input errors naming the file and
    tensor."""
    from safetensors.torch import load_file, save_file

    src = write_model_dir(
        tmp_path / "src", "llama", lora=LoraSpec(target_modules=("q_proj", "v_proj")), config_overrides=THREE
    )
    adapter = src / "adapter" / "adapter_model.safetensors"
    config = json.loads((src / "adapter" / "adapter_config.json").read_text())
    saved = load_file(str(adapter))
    hidden, vocab = tiny_config("llama").hidden_size, tiny_config("llama").vocab_size
    save_file({**saved, "base_model.model.lm_head.weight": torch.zeros(vocab, hidden)}, str(adapter))
    (src / "adapter" / "adapter_config.json").write_text(
        json.dumps({**config, "modules_to_save": ["lm_head"]})
    )
    with pytest.raises(InputError, match=r"modules_to_save tensors \('lm_head\.weight'\)"):
        export_engine(src, tmp_path / "out_head", ExportConfig(streaming="on", **FP32))
    assert not (tmp_path / "out_head").exists()

    plain = write_model_dir(tmp_path / "plain", "llama", config_overrides=THREE)
    weights = load_file(str(plain / "model.safetensors"))
    name = "model.layers.2.mlp.down_proj.weight"
    weights[name][0, 3] = float("nan")
    save_file(weights, str(plain / "model.safetensors"))
    with pytest.raises(
        InputError, match=rf"model\.safetensors: tensor '{re.escape(name)}' .* 1 non-finite values"
    ):
        export_engine(plain, tmp_path / "out_nan", ExportConfig(streaming="on", **FP32))
    assert not (tmp_path / "out_nan").exists()


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_reused_layer_graphs_equal_tracing_each_layer(tmp_path, family):
    """A layer signature traced once and reused (streaming/reuse.py) gives the same stitched graph (nodes,
    names, initializer values) as tracing every layer, with fewer traces."""
    from onnx import numpy_helper

    from exporter.export.streaming.stream import stream_decoder_export

    masks = {
        layer_param(family, 1, "o"): column_mask((64, 64), range(64)),
        layer_param(family, 0, "gate"): row_mask((96, 64), range(20)),
    }
    src = write_model_dir(
        tmp_path / "src",
        family,
        masks=masks,
        tokenizer=False,
        config_overrides={"num_hidden_layers": 4},
        shards=2,
        dtype=torch.bfloat16,
    )
    rng = np.random.default_rng(0)
    feeds = {"input_ids": rng.integers(0, 100, (2, 8)), "attention_mask": np.ones((2, 8), np.int64)}
    graphs, traces = [], []
    for reuse in (False, True):
        path = tmp_path / f"reuse{int(reuse)}" / "model.onnx"
        path.parent.mkdir()
        result = stream_decoder_export(
            load_model_dir(src, lazy=True), path, feeds, progress=False, reuse_traces=reuse
        )
        graphs.append(onnx.load(str(path)).graph)
        traces.append(result.layer_traces)
    assert traces == [4, 3]  # layers 2 and 3 share a signature
    a, b = graphs
    assert [(n.name, n.op_type, list(n.input), list(n.output)) for n in a.node] == [
        (n.name, n.op_type, list(n.input), list(n.output)) for n in b.node
    ]
    assert [t.name for t in a.initializer] == [t.name for t in b.initializer]
    for x, y in zip(a.initializer, b.initializer):
        np.testing.assert_array_equal(numpy_helper.to_array(x), numpy_helper.to_array(y), err_msg=x.name)


MIXED = {
    "all4": None,
    # q/k/v and the embedding at 8 bits, the rest 4; the LM head 8
    "mixed": dict(roles=(("q_proj", 8), ("k_proj", 8), ("v_proj", 8)), lm_head=8, embedding=8),
    # a packed group split across widths (q at 8, k/v at 4): kept as separate MatMulNBits, as cpu_model does
    "split": dict(roles=(("q_proj", 8), ("/layers.1/", 8))),
    "all8": dict(default=8, lm_head=8, embedding=8),
}


@pytest.mark.parametrize(
    "flags, flag",
    [
        (dict(precision="int4", int4_method="awq"), "--int4-method"),
        (dict(precision="int8", cpu_int8_weights="reduced"), "--cpu-int8-weights"),
    ],
)
def test_per_piece_export_refuses_flags_it_cannot_honour(tmp_path, monkeypatch, flags, flag):
    """A flag the per-piece files would not carry is an error before any work, not silently dropped."""
    import exporter.api

    src = write_model_dir(tmp_path / "src", "llama", tokenizer="llama3", config_overrides=THREE)
    monkeypatch.setattr(exporter.api, "WHOLE_FILE_CHECK_BYTES", 0)
    with pytest.raises(InputError, match=re.escape(flag)):
        export_engine(src, tmp_path / "out", ExportConfig(streaming="on", benchmark=False, **flags))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("variant", sorted(MIXED))
def test_per_piece_int4_equals_whole_model_rtn(tmp_path, variant):
    """quantized.nbits_cpu_file equals int4.cpu_model of the whole fused graph with every weight (and the
    embedding) in round-to-nearest blocks at the same per-piece widths, q/k/v and gate/up packed where
    their widths agree; the widths are recorded per MatMul."""
    import onnx_ir

    from exporter.export.external_data import save_onnx
    from exporter.export.streaming.piecewise import layer_of
    from exporter.quantize import per_piece as quantized
    from exporter.quantize.int4 import EMBEDDING, cpu_model, find_sites, prepare
    from exporter.quantize.int4_stage import PACKED_PROJECTIONS
    from graph_passes.pipeline import optimize

    src = write_model_dir(
        tmp_path / "src", "llama", masks=_masks("llama"), tokenizer="llama3", config_overrides=THREE
    )
    whole = export_engine(src, tmp_path / "whole", ExportConfig(streaming="off", **FP32))
    cleaned, _ = optimize(onnx.load(str(whole.artifacts["exported"])), "tensorrt", stages=("cleanup",))
    fused, _ = optimize(cleaned, "onnxruntime", family="llama", sparsity="off")
    bits = quantized.PieceBits(**MIXED[variant]) if MIXED[variant] else quantized.PieceBits()
    sites = find_sites(fused)
    names = {n.name: n for n in onnx_ir.from_proto(fused).graph}
    widths = {s.node: bits.lm_head if layer_of(names[s.node]) is None else bits.of(s.node) for s in sites}
    plan = prepare(fused, sites, None, method="rtn", block_size=32).plan(
        {**widths, EMBEDDING: bits.embedding}
    )
    model, _ = cpu_model(fused, plan, 4, PACKED_PROJECTIONS)
    reference = save_onnx(model, tmp_path / "model.int4.reference.onnx")
    out = tmp_path / "piece" / "model.int4.cpu.onnx"
    out.parent.mkdir()
    if variant == "all4":
        report = quantized.int4_cpu_file(whole.artifacts["exported"], out, "llama", 32, 4, 4)
    else:
        report = quantized.nbits_cpu_file(whole.artifacts["exported"], out, "llama", 32, 4, bits)
    assert report["embedding"] == {"table": plan.embedding[0], "bits": bits.embedding}
    assert report["layers"] == widths
    assert len(set(widths.values())) == (1 if variant in ("all4", "all8") else 2)
    nbits = {
        next(a.i for a in n.attribute if a.name == "bits")
        for n in onnx.load(str(out), load_external_data=False).graph.node
        if n.op_type in ("MatMulNBits", "GatherBlockQuantized")
    }
    assert nbits == set(widths.values()) | {bits.embedding}
    vocab = json.loads((src / "config.json").read_text())["vocab_size"]
    _assert_same_decoder(reference, out, vocab, whole.output_dir)
    a, b = (onnx.load(str(p)).graph for p in (reference, out))
    assert sorted(n.op_type for n in a.node) == sorted(n.op_type for n in b.node)


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_large_streamed_model_is_quantized_per_piece_and_gated(tmp_path, monkeypatch, precision):
    """Over WHOLE_FILE_CHECK_BYTES an INT8/INT4 export writes the CPU file per piece, checks it end to end
    (prefill + cached decode steps vs the streamed PyTorch reference), removes the fp32 intermediate, says
    what it did not write; a file that misses the gate fails the export."""
    import exporter.api
    from exporter.validate import tolerances

    src = write_model_dir(
        tmp_path / "src", "llama", tokenizer="llama3", masks=_masks("llama"), config_overrides=THREE
    )
    monkeypatch.setattr(exporter.api, "WHOLE_FILE_CHECK_BYTES", 0)
    config = dict(precision=precision, benchmark=False)
    out = export_engine(src, tmp_path / "out", ExportConfig(streaming="on", **config))
    files = {p.name for p in out.output_dir.iterdir()}
    cpu_file = f"model.{precision}.cpu.onnx"
    assert cpu_file in files and "model.exported.onnx" not in files and "model.onnx" not in files
    assert out.artifacts["onnx"].name == cpu_file
    e2e = out.report["validation_end_to_end"]
    assert e2e["decode_steps"] == 3 and e2e["gate"]["passed"]
    assert e2e["mean_cosine"] >= tolerances.tolerance(precision).min_mean_cosine
    assert out.report[precision]["not_written"]["tensorrt_files"]
    # the widths chosen per piece are recorded (report.json) and listed (report.md); INT8 is 8-bit blocks
    cpu = out.report[precision]["cpu"]
    assert set(cpu["layers"].values()) == ({8} if precision == "int8" else {4, 8})
    assert cpu["embedding"]["bits"] == 8
    graph = onnx.load(str(out.artifacts["onnx"]), load_external_data=False).graph
    assert {n.op_type for n in graph.node} >= {"MatMulNBits", "GatherBlockQuantized"}
    assert "quantized per piece" in (out.output_dir / "report.md").read_text()
    assert {"stream_export", precision, "validate_end_to_end"} <= set(out.report["peak_rss_gib"])
    strict = {**tolerances.TOLERANCES, precision: tolerances.Tolerance(min_mean_cosine=1.01)}
    monkeypatch.setattr(tolerances, "TOLERANCES", strict)
    with pytest.raises(ValidationError, match="end to end"):
        export_engine(src, tmp_path / "fails", ExportConfig(streaming="on", **config))
