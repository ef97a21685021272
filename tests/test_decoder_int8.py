"""INT8 quality metrics of a KV-cache decoder (exporter.generation.greedy_agreement): exact on identical
models, low on unrelated ones, so the numbers the export report carries can be trusted."""

from __future__ import annotations

import numpy as np
import pytest
from test_decoder_export import build_pruned_model, reference_session

from exporter.decoder_export import export_decoder_with_past
from exporter.generation import generate, greedy_agreement


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
    from exporter.generation import CachedDecoder

    decoder = CachedDecoder(b)
    decoder.reset(1)
    argmax = decoder.forward(tokens[:, :-1])[0, prompt.shape[1] - 1 :].argmax(axis=-1)
    expected = float(np.mean(argmax == tokens[0, prompt.shape[1] :]))
    assert greedy_agreement(a, b, [PROMPTS[0]], max_new_tokens=8)["greedy_agreement"] == expected


def test_calibration_feeds_are_prefills_of_each_layers_width(tmp_path):
    """The adapter adds position ids (as generation computes them) and empty pasts shaped per layer; the
    extended feeds run on the exported decoder and give the prefill logits of CachedDecoder."""
    from exporter.calibration import load_calibration
    from exporter.decoder_calibration import for_decoder
    from exporter.generation import CachedDecoder

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
