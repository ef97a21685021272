"""INT4 weight-only decoders (exporter/quantize/int4.py, int4_stage.py, graph_passes/matmul_nbits.py,
dequantize_blockwise.py) on tiny pruned Llama / Qwen2 whose per-layer widths are not multiples of the block
(layer 1: o_proj reads 48 channels, layer 2: 32; block 32 -> padded K)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper
from test_decoder_export import build_pruned_model

from engines.tensorrt.checks import prebuild_check
from export_errors import ValidationError
from exporter.export.decoder_with_past import export_decoder_with_past
from exporter.quantize import int4
from exporter.quantize.awq import clip_weight, output_error, quantize_weight, search_input_scale
from exporter.quantize.blocks import dequantize_blocks, quantize_blocks, tensorrt_blocks
from exporter.quantize.calibration import load_calibration
from exporter.quantize.decoder_calibration import for_decoder
from exporter.quantize.int4_stage import Int4Config, run_int4_stage
from exporter.quantize.int8 import token_cosines
from graph_passes.pipeline import optimize


def _session(model, optimize_graph: bool = False) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if not optimize_graph:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


class Decoder:
    """One exported tiny decoder: its fused CPU graph, its TensorRT-target graph, calibration rows."""

    def __init__(self, family: str, root, model=None) -> None:
        self.family = family
        self.exported = root / "decoder.onnx"
        export_decoder_with_past(build_pruned_model(family) if model is None else model, self.exported)
        self.cpu, _ = optimize(onnx.load(str(self.exported)), "onnxruntime", family=family, sparsity="off")
        self.trt, _ = optimize(onnx.load(str(self.exported)), "tensorrt", stages=("cleanup",), family=family)
        self.cpu_path = root / "cpu_fp32.onnx"
        onnx.save(self.cpu, str(self.cpu_path))
        self.calibration = load_calibration(
            "random", None, ["input_ids", "attention_mask"], 4, 24, 24, 8, vocab_size=128
        )
        self.data = for_decoder(self.calibration, self.cpu_path, 0)
        self.sites = int4.find_sites(self.cpu)
        self.rows = int4.collect_rows(self.cpu_path, [s.x for s in self.sites], self.data)

    def logits(self, model, optimize_graph: bool = False) -> list[tuple[np.ndarray, np.ndarray]]:
        session = _session(model, optimize_graph)
        wanted = {i.name for i in session.get_inputs()}
        return [
            (session.run(["logits"], {k: v for k, v in f.items() if k in wanted})[0], f["attention_mask"])
            for f in self.data.batches("heldout")
        ]

    def cosine(self, model, optimize_graph: bool = True) -> float:
        ref = self.logits(self.cpu)
        out = self.logits(model, optimize_graph)
        return float(np.mean(np.concatenate([token_cosines(r, o, m) for (r, m), (o, _) in zip(ref, out)])))


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def decoder(request, tmp_path_factory):
    return Decoder(request.param, tmp_path_factory.mktemp(request.param))


def test_sites_cover_every_projection_with_exact_fold_targets(decoder):
    """q/k/v and gate/up fold into their RMSNorm gain, down into up's columns, o_proj nowhere; lm_head too."""
    roles = {}
    for site in decoder.sites:
        role = site.node.split("/")[-2]
        roles.setdefault(role, set()).add(site.fold[0] if site.fold else None)
    assert roles == {
        "q_proj": {"gain"},
        "k_proj": {"gain"},
        "v_proj": {"gain"},
        "o_proj": {None},
        "gate_proj": {"gain"},
        "up_proj": {"gain"},
        "down_proj": {"columns"},
        "lm_head": {"gain"},
    }
    assert len(decoder.sites) == 3 * 7 + 1
    trt = {s.node: s.fold for s in int4.find_sites(decoder.trt)}  # the unfused RMSNorm: same targets
    assert trt == {s.node: s.fold for s in decoder.sites}
    widths = {
        numpy_helper.to_array(i).shape[0]
        for i in decoder.cpu.graph.initializer
        if i.name in {s.weight for s in decoder.sites}
    }
    assert any(k % 32 for k in widths), widths  # a pruned width that is not a multiple of the block


def test_awq_scales_and_folds_keep_the_fp32_function(decoder):
    """With the input scales folded (gains / s, up's columns / s_down) and s·W stored unrounded, the fp32
    model computes what it did: the folds are exact, only rounding can differ."""
    prepared = int4.prepare(decoder.cpu, decoder.sites, decoder.rows, method="awq")
    assert prepared.scales and prepared.gains
    assert any(np.ptp(s) > 0.05 for s, _ in prepared.scales.values())  # not all identity
    folded = int4._with_gains(decoder.cpu, prepared.gains)
    inits = {i.name: i for i in folded.graph.initializer}
    for site in decoder.sites:
        inits[site.weight].CopyFrom(numpy_helper.from_array(prepared.stored(site.node), site.weight))
    for (ref, _), (out, _) in zip(decoder.logits(decoder.cpu), decoder.logits(folded)):
        assert np.abs(ref - out).max() <= 1e-4


def test_cpu_file_holds_our_reference_quantization_and_runs(decoder):
    """RTN: every MatMulNBits holds exactly quantize_blocks(W) (ONNX Runtime's own packing, tested bit-exact in
    test_int4_blocks.py), K padded where pruning left a ragged width; the file runs on ONNX Runtime."""
    plan = int4.prepare(decoder.cpu, decoder.sites, None, method="rtn").plan()
    model, report = int4.cpu_model(decoder.cpu, plan)
    weights = {
        s.node: numpy_helper.to_array(next(i for i in decoder.cpu.graph.initializer if i.name == s.weight))
        for s in decoder.sites
    }
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    nodes = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    assert len(nodes) == len(decoder.sites) and report["counts"] == {"MatMulNBits_4bit": len(decoder.sites)}
    for node in nodes:
        reference = quantize_blocks(weights[node.name.removesuffix("_Q4")], 4, 32)
        assert inits[node.input[1]].tobytes() == reference.packed.tobytes()
        np.testing.assert_array_equal(inits[node.input[2]], reference.scales.reshape(-1))
        attrs = {a.name: a.i for a in node.attribute}
        assert attrs["K"] == reference.k and attrs["accuracy_level"] == 4 and attrs["block_size"] == 32
    assert any(a.i % 32 for n in nodes for a in n.attribute if a.name == "K")
    assert decoder.cosine(model) > 0.5  # runs and means something; the gate is the stage's (below)


def test_gathered_embedding_is_our_dequantized_table(decoder):
    plan = int4.prepare(decoder.cpu, decoder.sites, None, method="rtn").plan()
    _table, quantized = plan.embedding
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "ids"], ["rows"])],
        "g",
        [helper.make_tensor_value_info("ids", onnx.TensorProto.INT64, [None])],
        [helper.make_tensor_value_info("rows", onnx.TensorProto.FLOAT, [None, None])],
        [numpy_helper.from_array(np.zeros((quantized.n, quantized.k), np.float32), "table")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    int4._quantize_gather(model, "table", quantized)
    ids = np.array([0, 5, 127, 3], np.int64)
    got = _session(model).run(None, {"ids": ids})[0]
    np.testing.assert_array_equal(got, dequantize_blocks(quantized).T[ids])


def test_tensorrt_file_passes_prebuild_checks_and_is_the_dequantized_arithmetic(decoder):
    """The TensorRT file (mixed: some layers 8-bit per channel) equals, on ONNX Runtime, the fp32 graph whose
    MatMul weights are the values it dequantizes to; and TensorRT's pre-build checks find nothing."""
    prepared = int4.prepare(decoder.cpu, decoder.sites, decoder.rows, method="awq")
    wide = {decoder.sites[1].node: 8, decoder.sites[4].node: 8}
    plan = prepared.plan(wide)
    model, report = int4.tensorrt_model(decoder.trt, plan)
    assert prebuild_check(model) == []
    assert report["counts"] == {"DequantizeLinear_int4": len(decoder.sites) - 2, "DequantizeLinear_int8": 2}
    assert next(o.version for o in model.opset_import if o.domain == "") == 21
    reference = int4._with_gains(decoder.trt, plan.gains)
    inits = {i.name: i for i in reference.graph.initializer}
    for site in decoder.sites:
        q = plan.weights[site.node]
        block = None if site.node in wide else q.block_size
        values, scales = tensorrt_blocks(q.rounded_from, q.bits, block)
        assert (scales > 0).all() and np.abs(values).max() <= 2 ** (q.bits - 1) - 1
        assert (scales.astype(np.float16).astype(np.float32) == scales).all()
        weight = values.astype(np.float32) * np.repeat(scales, block or q.k, axis=0)[: values.shape[0]]
        inits[site.weight].CopyFrom(numpy_helper.from_array(weight[: q.k], site.weight))
    for (want, mask), (got, _) in zip(decoder.logits(reference), decoder.logits(model)):
        error = np.abs(got - want)[mask.astype(bool)]
        assert error.max() <= 1e-4, f"max abs error {error.max():.3e}"


def test_tensorrt_checks_know_the_int4_rules(decoder):
    plan = int4.prepare(decoder.cpu, decoder.sites, None, method="rtn").plan()
    model, _ = int4.tensorrt_model(decoder.trt, plan)
    dq = next(n for n in model.graph.node if n.op_type == "DequantizeLinear")
    weight = next(i for i in model.graph.initializer if i.name == dq.input[0])
    broken = onnx.ModelProto()
    broken.CopyFrom(model)
    bad = next(i for i in broken.graph.initializer if i.name == weight.name)
    bad.data_type = onnx.TensorProto.UINT4
    next(o for o in broken.opset_import if o.domain == "").version = 19
    next(
        a for a in next(n for n in broken.graph.node if n.name == dq.name).attribute if a.name == "block_size"
    ).i = 24
    text = " | ".join(str(p) for p in prebuild_check(broken))
    assert "UINT4" in text and "opset >= 21" in text and "not a multiple of block_size 24" in text
    assert "scale" in text and "shape" in text


def test_awq_beats_rtn_on_salient_channels():
    """A weight whose few input channels meet 30x activations (small weights there, as in trained LLMs after
    planted-outlier folding): AWQ-style scaling + clipping cuts the output error well below RTN's."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((256, 96)).astype(np.float32)
    w = rng.standard_normal((96, 40)).astype(np.float32)
    x[:, [3, 50, 77]] *= 30.0
    w[[3, 50, 77]] /= 30.0
    rtn = output_error(x, w, dequantize_blocks(quantize_blocks(w, 4, 32)))
    s, alpha, _ = search_input_scale([w], x, 4, 32)
    quantized, report = quantize_weight(
        w, bits=4, block_size=32, method="awq", activations=x, scale=s, alpha=alpha
    )
    effective = dequantize_blocks(quantized) / s[:, None]
    assert alpha > 0 and report.error == pytest.approx(output_error(x, w, effective))
    assert report.error < 0.5 * rtn and report.error_rtn == pytest.approx(rtn)
    clipped, ratio = clip_weight(w, x, 4, 32)
    assert ratio <= 1.0 and output_error(x, w, dequantize_blocks(quantize_blocks(clipped, 4, 32))) <= rtn


def test_stage_meets_its_gate_and_reports_every_layer(decoder, tmp_path):
    config = Int4Config(min_cosine=0.98)
    result = run_int4_stage(decoder.exported, tmp_path, decoder.calibration, config, family=decoder.family)
    report = result.report
    assert report["gate"]["passed"] and report["cpu"]["heldout_cosine"] >= 0.98
    assert report["tensorrt"]["heldout_cosine"] >= 0.98
    assert set(report["method_comparison_search_cosine"]) == {"awq", "rtn"}
    layers = {row["node"]: row for row in report["layers"]}
    assert len(layers) == len(decoder.sites)
    assert {row["bits"] for row in layers.values()} <= {4, 8}
    widened = [n for n in report["int8_layers"] if n != int4.EMBEDDING]
    assert all(layers[n]["bits"] == 8 for n in widened)
    assert all("error" in row and "error_rtn" in row and row["method"] == "awq" for row in layers.values())
    assert any("input_scale" in row and "alpha" in row for row in layers.values())
    assert decoder.cosine(result.cpu_path) == pytest.approx(report["cpu"]["heldout_cosine"], abs=1e-6)
    assert prebuild_check(onnx.load(str(result.tensorrt_path))) == []


def test_gate_miss_raises_with_the_numbers(decoder, tmp_path):
    config = Int4Config(min_cosine=0.99999, mixed_precision=False)
    with pytest.raises(ValidationError, match=r"INT4 accuracy gate failed.*held-out logit cosine 0\.\d+"):
        run_int4_stage(decoder.exported, tmp_path, decoder.calibration, config, family=decoder.family)


def test_switchable_models_compute_each_plan(decoder):
    """The search's one-session graphs: switch all off = the all-4-bit files, one layer on = that layer 8-bit."""
    prepared = int4.prepare(decoder.cpu, decoder.sites, decoder.rows, method="awq")
    candidates = [s.node for s in decoder.sites] + [int4.EMBEDDING]
    cpu, trt = int4.switchable_models(decoder.cpu, decoder.trt, prepared, {}, candidates)
    wide = candidates[3]
    for files, build in ((cpu, int4.cpu_model), (trt, int4.tensorrt_model)):
        for switch in (np.zeros(len(candidates), bool), np.arange(len(candidates)) == 3):
            plan = prepared.plan({wide: 8} if switch.any() else {})
            want = decoder.logits(build(decoder.trt if files is trt else decoder.cpu, plan)[0])
            session = _session(files)
            for (expected, _), feeds in zip(want, decoder.data.batches("heldout")):
                names = {i.name for i in session.get_inputs()}
                got = session.run(
                    ["logits"], {**{k: v for k, v in feeds.items() if k in names}, int4.SWITCH_INPUT: switch}
                )[0]
                np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)


def test_packed_projections_compute_what_the_separate_ones_do(decoder):
    """q/k/v and gate/up packed into one MatMulNBits + Split each: the same numbers (concatenation along N is
    exact), fewer kernel calls; a group whose widths differ (one member 8-bit) stays separate."""
    prepared = int4.prepare(decoder.cpu, decoder.sites, decoder.rows, method="awq")
    k_proj = next(s.node for s in decoder.sites if "layers.0/self_attn/k_proj" in s.node)
    plan = prepared.plan({k_proj: 8})
    separate, _ = int4.cpu_model(decoder.cpu, plan)
    packed, report = int4.cpu_model(
        decoder.cpu, plan, pack=("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
    )
    ops = [n.op_type for n in packed.graph.node]
    assert ops.count("Split") == 3 + 2 and ops.count("MatMulNBits") == len(decoder.sites) - 2 * 2 - 3
    assert report["counts"] == {"MatMulNBits_4bit": ops.count("MatMulNBits") - 1, "MatMulNBits_8bit": 1}
    for (want, _), (got, _) in zip(decoder.logits(separate, True), decoder.logits(packed, True)):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def test_packing_fp32_is_exact_and_idempotent(decoder):
    from graph_passes.pack_matmuls import pack_matmuls

    packed = onnx.ModelProto()
    packed.CopyFrom(decoder.cpu)
    roles = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
    groups = pack_matmuls(packed, roles)
    assert len(groups) == 2 * 3 and all(len(m) in (2, 3) for m in groups.values())
    assert pack_matmuls(packed, roles) == {}  # a second run finds nothing to pack
    for (want, _), (got, _) in zip(decoder.logits(decoder.cpu), decoder.logits(packed)):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
