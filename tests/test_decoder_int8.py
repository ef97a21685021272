"""INT8 quality metrics of a KV-cache decoder (exporter.runtime.generation.greedy_agreement): exact on identical
models, low on unrelated ones, so the numbers the export report carries can be trusted."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from test_decoder_export import build_pruned_model, reference_session

from exporter.export.decoder_with_past import export_decoder_with_past
from exporter.runtime.generation import generate, greedy_agreement


@pytest.fixture(scope="module")
def two_models(tmp_path_factory):
    paths = []
    for seed in (1, 2):
        path = tmp_path_factory.mktemp(f"llama{seed}") / "decoder_model.onnx"
        export_decoder_with_past(build_pruned_model("llama", seed=seed), path)
        paths.append(path)
    return [reference_session(p) for p in paths]


PROMPTS = [np.arange(3, 10), np.array([5, 90, 17, 44])]


def test_identical_models_agree_exactly(two_models):
    quality = greedy_agreement(two_models[0], two_models[0], PROMPTS, max_new_tokens=8)
    assert quality["new_tokens"] == 16 and quality["prompts"] == 2
    assert quality["greedy_agreement"] == 1.0 and quality["free_running_agreement"] == 1.0
    assert quality["mean_identical_prefix"] == 8.0
    assert quality["logit_mean_cosine"] == pytest.approx(1.0, abs=1e-9)


def test_unrelated_models_disagree(two_models):
    quality = greedy_agreement(*two_models, PROMPTS, max_new_tokens=8)
    assert quality["greedy_agreement"] < 0.5, quality
    assert quality["logit_mean_cosine"] < 0.9, quality


def test_teacher_forced_agreement_counts_the_candidates_argmax(two_models):
    """Agreement of A vs B is the share of steps where B's argmax, given A's tokens, is A's next token."""
    a, b = two_models
    prompt = PROMPTS[0][None, :]
    tokens = generate(a, prompt, max_new_tokens=8)
    from exporter.runtime.generation import CachedDecoder

    decoder = CachedDecoder(b)
    decoder.reset(1)
    argmax = decoder.forward(tokens[:, :-1])[0, prompt.shape[1] - 1 :].argmax(axis=-1)
    expected = float(np.mean(argmax == tokens[0, prompt.shape[1] :]))
    assert greedy_agreement(a, b, [PROMPTS[0]], max_new_tokens=8)["greedy_agreement"] == expected


def test_shared_reference_runs_give_the_same_numbers_and_run_the_reference_once(two_models):
    """Two candidates judged against one reference with `reference_runs`: each gets the numbers it gets alone,
    and the reference generates and scores each prompt once."""
    reference, other = two_models
    calls = []

    class Counting:
        def __init__(self, session):
            self.session = session

        def __getattr__(self, name):
            return getattr(self.session, name)

        def run(self, *args, **kwargs):
            calls.append(1)
            return self.session.run(*args, **kwargs)

    alone = [greedy_agreement(reference, c, PROMPTS, max_new_tokens=8) for c in (other, reference)]
    runs: dict = {}
    counting = Counting(reference)
    shared = [
        greedy_agreement(counting, c, PROMPTS, max_new_tokens=8, reference_runs=runs)
        for c in (other, reference)
    ]
    assert shared == alone
    first = len(calls)
    assert first > 0 and len(runs) == len(PROMPTS)
    greedy_agreement(counting, other, PROMPTS, max_new_tokens=8, reference_runs=runs)
    assert len(calls) == first  # nothing recomputed


def test_calibration_feeds_are_prefills_of_each_layers_width(tmp_path):
    """The adapter adds position ids (as generation computes them) and empty pasts shaped per layer; the
    extended feeds run on the exported decoder and give the prefill logits of CachedDecoder."""
    from exporter.quantize.calibration import load_calibration
    from exporter.quantize.decoder_calibration import for_decoder
    from exporter.runtime.generation import CachedDecoder

    path = tmp_path / "decoder_model.onnx"
    manifest = export_decoder_with_past(build_pruned_model("qwen2", seed=3), path)
    data = load_calibration("random", None, ["input_ids", "attention_mask"], 2, 12, 6, 2, vocab_size=128)
    extended = for_decoder(data, path)
    for i, layer in enumerate(manifest.layers):
        assert extended.calibration[f"past_key_values.{i}.value"].shape == (6, layer.n_kv, 0, layer.head_dim)
    assert len({layer.n_kv for layer in manifest.layers}) > 1  # widths differ per layer
    session = reference_session(path)
    feeds = next(extended.batches("heldout"))
    mask = feeds["attention_mask"]
    assert (feeds["position_ids"][mask == 1] == np.concatenate([np.arange(n) for n in mask.sum(1)])).all()
    logits = session.run(["logits"], feeds)[0]
    decoder = CachedDecoder(session)
    decoder.reset(2, mask)
    np.testing.assert_allclose(logits, decoder.forward(feeds["input_ids"]), rtol=0, atol=1e-6)


# ------------------------------------------------------------------ decode-step calibration feeds

STEPS = 3
LENGTHS = [12, 10, 9, 5, 3, 12]  # > 2 * STEPS real tokens: teacher forcing; the rest: greedy


@pytest.fixture(scope="module")
def pruned_llama(tmp_path_factory):
    """Tiny Llama, layer 1 pruned to 3 of 4 KV heads (a lost group): per-layer KV widths differ."""
    path = tmp_path_factory.mktemp("pruned_llama") / "decoder_model.onnx"
    manifest = export_decoder_with_past(build_pruned_model("llama", seed=3), path)
    return path, manifest


def _token_data(lengths, seq_len=12, batch=4, seed=0, vocab=(1, 128)):
    from exporter.quantize.calibration import CalibrationData

    rng = np.random.default_rng(seed)
    mask = (np.arange(seq_len)[None, :] < np.array(lengths)[:, None]).astype(np.int64)
    feeds = {"input_ids": rng.integers(*vocab, size=mask.shape) * mask, "attention_mask": mask}
    return CalibrationData(feeds, {k: v[:2] for k, v in feeds.items()}, batch, "test")


@pytest.mark.parametrize("step_batch_factor", [1, 16])  # decode steps in chunks of 4 + 2 samples, or one
def test_decode_step_feeds_follow_the_prefill_per_layer_width(pruned_llama, step_batch_factor, monkeypatch):
    """Step j: one token per sample, pasts [samples, n_kv_i, L + j, head_dim] of each layer's own width,
    positions continuing from the prefill; teacher-forced rows feed the held-back tokens and reproduce
    the full-sample prefill's logits, greedy rows feed the fp32 argmax."""
    from exporter.quantize import decoder_calibration
    from exporter.quantize.decoder_calibration import for_decoder

    monkeypatch.setattr(decoder_calibration, "STEP_BATCH_FACTOR", step_batch_factor)

    path, manifest = pruned_llama
    data = _token_data(LENGTHS)
    decoded = for_decoder(data, path, decode_steps=STEPS)
    ids, lengths = data.calibration["input_ids"], np.array(LENGTHS)
    teacher = lengths > 2 * STEPS
    assert (decoded.calibration["attention_mask"].sum(1) == np.where(teacher, lengths - STEPS, lengths)).all()
    assert len({layer.n_kv for layer in manifest.layers}) > 1
    session = reference_session(path)
    full = session.run(["logits"], for_decoder(data, path, decode_steps=0).calibration)[0]
    last = full[np.arange(len(lengths)), lengths - 1]
    steps = decoded.groups["calibration"]
    assert len(steps) == STEPS and len(decoded.groups["heldout"]) == STEPS
    for j, feeds in enumerate(steps):
        for i, layer in enumerate(manifest.layers):
            for kind in ("key", "value"):
                shape = feeds[f"past_key_values.{i}.{kind}"].shape
                assert shape == (len(lengths), layer.n_kv, 12 + j, layer.head_dim), (j, i, shape)
        assert feeds["input_ids"].shape == (len(lengths), 1) and feeds["attention_mask"].shape[1] == 13 + j
        position = np.where(teacher, lengths - STEPS + j, lengths + j)
        assert (feeds["position_ids"][:, 0] == position).all(), (j, feeds["position_ids"])
        token = feeds["input_ids"][:, 0]
        assert (token[teacher] == ids[teacher, lengths[teacher] - STEPS + j]).all()
        assert (token[~teacher] == last[~teacher].argmax(-1)).all()
        logits = session.run(["logits"], feeds)[0][:, 0]
        want = full[teacher, lengths[teacher] - STEPS + j]
        error = np.abs(logits[teacher] - want)
        assert error.max() <= 1e-4, f"step {j}: max abs error {error.max():.3e} vs the full prefill"
        last = logits
    for name in ("past_key_values.0.key", "past_key_values.1.value"):  # views of one array: no K copies
        assert np.shares_memory(steps[0][name], steps[-1][name])


def test_calibration_batches_cover_every_group():
    data = _token_data(LENGTHS, batch=4)
    data.groups = {"calibration": [{"x": np.zeros((6, 1, 3))}, {"x": np.zeros((6, 1, 4))}]}
    shapes = [next(iter(b.values())).shape for b in data.batches("calibration")]
    assert shapes == [(4, 12), (2, 12), (4, 1, 3), (2, 1, 3), (4, 1, 4), (2, 1, 4)]
    assert data.num_batches("calibration") == 6
    assert [next(iter(b.values())).shape[0] for b in data.batches("calibration", limit=3)] == [3, 3, 3]
    assert data.describe()["group_shapes"] == [{"x": [1, 3]}, {"x": [1, 4]}]
    data.group_batch = 5  # decode steps: more samples per feed than the prefill batch
    assert [next(iter(b.values())).shape[0] for b in data.batches("calibration")] == [4, 2, 5, 1, 5, 1]
    assert data.num_batches("calibration") == 6


def test_ranges_include_decode_step_activations(tmp_path):
    """A planted token (one huge embedding channel, amplified by layer 0's norm) occurs only as the last
    token of each sample, so with decode-step calibration only a decode step sees it: the ranges grow
    when the decode-step groups are collected and equal the full-sample prefill's (same token, same
    position), and stay small if the groups were ignored."""
    import dataclasses

    import onnx_ir as ir
    import torch

    from exporter.quantize.decoder_calibration import for_decoder
    from exporter.quantize.ranges import collect_ranges
    from graph_passes.insert_qdq import activation_tensors, plan

    planted, channel = 127, 5
    model = build_pruned_model("llama", seed=3)
    with torch.no_grad():
        model.model.embed_tokens.weight[planted] = 0.0
        model.model.embed_tokens.weight[planted, channel] = 50.0
        model.model.layers[0].input_layernorm.weight[channel] = 20.0
    path = tmp_path / "decoder_model.onnx"
    export_decoder_with_past(model, path)
    data = _token_data([12, 11, 10, 9, 12, 8], vocab=(1, planted))
    rows = np.arange(6)
    data.calibration["input_ids"][rows, data.calibration["attention_mask"].sum(1) - 1] = planted
    names = activation_tensors(plan(ir.load(str(path))))
    decoded = for_decoder(data, path, decode_steps=2)
    with_steps = collect_ranges(path, names, decoded, "max")
    ignored = collect_ranges(path, names, dataclasses.replace(decoded, groups={}), "max")
    full_prefill = collect_ranges(path, names, for_decoder(data, path, decode_steps=0), "max")
    ratio = {n: with_steps[n] / max(ignored[n], 1e-12) for n in names}
    grown = max(ratio, key=ratio.get)
    assert ratio[grown] > 3, ratio
    assert with_steps[grown] == pytest.approx(full_prefill[grown], rel=1e-3)


# run_int8_stage's arguments for the pruned tiny Llama (no tokenizer: random calibration)
TINY_LLAMA_STAGE = dict(
    family="llama",
    tokenizer_path=None,
    input_names=["input_ids", "attention_mask"],
    sequence_length=16,
    vocab_size=128,
    decoder_with_past=True,
)


def test_int8_stage_calibrates_decode_steps_and_reports_them(pruned_llama, tmp_path):
    from export_errors import InputError
    from exporter.config import ExportConfig
    from exporter.quantize.int8_stage import run_int8_stage

    path, _ = pruned_llama
    config = ExportConfig(calibration="random", calibration_samples=8, calibration_decode_steps=2)
    kwargs = TINY_LLAMA_STAGE
    _, section = run_int8_stage(path, tmp_path / "out", config, **kwargs)
    assert section["decoder_calibration"]["decode_steps"] == 2
    steps = section["calibration"]["group_shapes"]
    assert [s["past_key_values.1.key"] for s in steps] == [[3, 16, 8], [3, 17, 8]]  # layer 1: 3 KV heads
    assert [s["input_ids"] for s in steps] == [[1], [1]]
    with pytest.raises(InputError, match="--calibration-decode-steps"):
        bad = ExportConfig(calibration="random", calibration_samples=8, calibration_decode_steps=-1)
        run_int8_stage(path, tmp_path / "bad", bad, **kwargs)


def test_the_judges_session_of_the_qdq_file_computes_the_file(pruned_llama, tmp_path):
    """The INT8 stage hands over its held-out judge's session of the Q/DQ graph (its target fusion changed no
    node here): a decoder's checks run on it instead of a new session of the file, with the same bits."""
    from exporter.config import ExportConfig
    from exporter.quantize.decoder_calibration import past_shapes, prefill_feeds
    from exporter.quantize.int8_stage import run_int8_stage
    from exporter.validate.sessions import check_session

    path, _ = pruned_llama
    config = ExportConfig(calibration="random", calibration_samples=8)
    seen = []
    result, _section = run_int8_stage(
        path,
        tmp_path / "out",
        config,
        **TINY_LLAMA_STAGE,
        on_file=lambda file, variant, judged: seen.append((variant, judged)),
    )
    assert seen == [("cpu", False), ("tensorrt", True)]
    assert result.tensorrt_session is not None
    mask = (np.arange(12)[None, :] < np.array([12, 7, 3])[:, None]).astype(np.int64)
    ids = np.random.default_rng(0).integers(1, 128, size=mask.shape) * mask
    feeds = prefill_feeds(
        {"input_ids": ids, "attention_mask": mask, "position_ids": np.maximum(mask.cumsum(1) - 1, 0)},
        past_shapes(path),
    )
    wanted = {i.name for i in result.tensorrt_session.get_inputs()}
    feeds = {k: v for k, v in feeds.items() if k in wanted}
    judged = result.tensorrt_session.run(None, feeds)[0]
    fresh = check_session(result.tensorrt_path).run(None, feeds)[0]  # optimizations off, as the checks ran it
    assert np.array_equal(judged, fresh)


def test_same_graph_sees_any_change_of_computation_and_ignores_value_info():
    import copy

    from onnx import helper, numpy_helper

    from exporter.quantize.int8_stage import same_graph

    weight = numpy_helper.from_array(np.arange(6, dtype=np.float32).reshape(2, 3), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm"), helper.make_node("Relu", ["y"], ["z"])],
        "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 2])],
        [helper.make_tensor_value_info("z", onnx.TensorProto.FLOAT, [1, 3])],
        [weight],
    )
    model = helper.make_model(graph)
    assert same_graph(model, copy.deepcopy(model))
    typed = copy.deepcopy(model)
    typed.graph.value_info.append(helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 3]))
    assert same_graph(model, typed)
    for change in (
        lambda m: m.graph.node[1].CopyFrom(helper.make_node("Sigmoid", ["y"], ["z"])),
        lambda m: m.graph.initializer[0].CopyFrom(
            numpy_helper.from_array(np.arange(6, dtype=np.float32).reshape(2, 3) + 1e-3, "w")
        ),
        lambda m: m.graph.node.append(helper.make_node("Identity", ["z"], ["unused"])),
        lambda m: m.graph.output[0].CopyFrom(
            helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)
        ),
    ):
        changed = copy.deepcopy(model)
        change(changed)
        assert not same_graph(model, changed)
