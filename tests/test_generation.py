"""Generation on the exported decoder (ONNX Runtime, KV cache) against PyTorch's `generate`."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_decoder_export import build_pruned_model, reference_session

from engines.onnxruntime_runner import OnnxRuntimeRunner
from export_errors import InputError
from exporter.export.decoder_with_past import export_decoder_with_past
from exporter.runtime.generation import generate

STEPS = 16


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def exported(request, tmp_path_factory):
    model = build_pruned_model(request.param, seed=1)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    path = tmp_path_factory.mktemp(request.param) / "decoder_model.onnx"
    export_decoder_with_past(model, path)
    return model, path


def torch_greedy(model, prompt: np.ndarray, steps: int, **kwargs) -> np.ndarray:
    with torch.no_grad():
        out = model.generate(torch.from_numpy(prompt), max_new_tokens=steps, do_sample=False, **kwargs)
    return out.numpy()


def prompts(batch: int, length: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 128, (batch, length), dtype=np.int64)


@pytest.mark.parametrize("batch", [1, 3])
def test_greedy_equals_torch_generate(exported, batch):
    model, path = exported
    prompt = prompts(batch, 7)
    want = torch_greedy(model, prompt, STEPS)
    got = generate(reference_session(path), prompt, max_new_tokens=STEPS)
    assert got.shape == (batch, 7 + STEPS)
    mismatch = np.argwhere(got != want)
    assert mismatch.size == 0, f"first mismatch (row, position) {mismatch[0]}: {got} vs {want}"
    assert len(np.unique(got[:, 7:])) > 3, "degenerate test model: greedy repeats one token"


def test_greedy_on_the_onnxruntime_runner(exported):
    model, path = exported
    prompt = prompts(1, 5, seed=2)
    with OnnxRuntimeRunner(path, threads=1) as runner:
        got = generate(runner, prompt, max_new_tokens=STEPS)
    np.testing.assert_array_equal(got, torch_greedy(model, prompt, STEPS))


def test_eos_stops_like_torch_generate(exported):
    model, path = exported
    prompt = prompts(1, 6, seed=3)
    free = generate(reference_session(path), prompt, max_new_tokens=STEPS)
    eos = int(free[0, 6 + 4])  # the fifth generated token
    first = 6 + int(np.argmax(free[0, 6:] == eos))
    got = generate(reference_session(path), prompt, max_new_tokens=STEPS, eos_token_id=eos)
    assert got.shape[1] == first + 1 and got[0, -1] == eos
    np.testing.assert_array_equal(got, torch_greedy(model, prompt, STEPS, eos_token_id=eos))


def test_sampling_with_a_seed_is_reproducible(exported):
    _, path = exported
    session = reference_session(path)
    prompt = prompts(2, 4, seed=5)
    kwargs = {"max_new_tokens": STEPS, "do_sample": True, "temperature": 1.5, "top_k": 20}
    first = generate(session, prompt, seed=7, **kwargs)
    np.testing.assert_array_equal(first, generate(session, prompt, seed=7, **kwargs))
    assert (first != generate(session, prompt, seed=8, **kwargs)).any(), "the seed has no effect"
    greedy = generate(session, prompt, max_new_tokens=STEPS)
    np.testing.assert_array_equal(generate(session, prompt, seed=9, **{**kwargs, "top_k": 1}), greedy)


def test_bad_prompt_is_an_input_error(exported):
    _, path = exported
    with pytest.raises(InputError, match="input_ids"):
        generate(reference_session(path), np.zeros((1, 0), dtype=np.int64), max_new_tokens=2)


def test_left_padded_batch_greedy_equals_torch_generate(exported):
    model, path = exported
    prompt = prompts(2, 7, seed=11)
    mask = np.ones_like(prompt)
    prompt[0, :2], mask[0, :2] = 0, 0
    with torch.no_grad():
        want = model.generate(
            torch.from_numpy(prompt),
            attention_mask=torch.from_numpy(mask),
            max_new_tokens=STEPS,
            do_sample=False,
        ).numpy()
    got = generate(reference_session(path), prompt, max_new_tokens=STEPS, attention_mask=mask)
    np.testing.assert_array_equal(got, want)
