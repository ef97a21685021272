"""The held-out judge's early stop (exporter/quantize/early_stop.py): it stops only at chunk boundaries, with
enough samples and the mean clear of the target; what it judged is the split's first samples; a split near
its target, or with no target, is judged whole, with the same number as before."""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
from quant_test_models import DIM, mlp_with_outlier

from exporter.quantize import early_stop, int8
from exporter.quantize.calibration import CalibrationData
from exporter.quantize.early_stop import CHUNK, MIN_SAMPLES, EarlyStop, Z


def _stop(target: float | None, per_sample: list[list[float]], total: int) -> EarlyStop:
    stop = EarlyStop(target, total)
    for cosines in per_sample:
        stop.add(np.array(cosines), np.zeros(len(cosines), dtype=np.int64), 1)
    return stop


def test_lower_bound_is_the_ratio_estimators_delta_method_bound() -> None:
    per_sample = [[0.99, 0.98], [0.97], [0.995, 0.99, 0.985]]
    stop = _stop(0.9, per_sample, 10)
    sums = np.array([sum(c) for c in per_sample])
    tokens = np.array([len(c) for c in per_sample], dtype=float)
    mean = sums.sum() / tokens.sum()
    se = math.sqrt(np.sum((sums - mean * tokens) ** 2) / (3 * 2)) / tokens.mean()
    assert stop.mean() == pytest.approx(np.mean(np.concatenate(per_sample)), abs=1e-15)  # token-weighted
    assert stop.lower_bound() == pytest.approx(mean - Z * se, abs=1e-15)


@pytest.mark.parametrize("min_samples", [3, MIN_SAMPLES, CHUNK + 1])
def test_stops_only_at_a_chunk_boundary_with_enough_samples_clear_of_the_target(
    monkeypatch, min_samples
) -> None:
    monkeypatch.setattr(early_stop, "MIN_SAMPLES", min_samples)
    stop = EarlyStop(0.9, 64)
    seen = []
    for _sample in range(64):
        stop.add(np.array([0.999, 0.998]), np.zeros(2, dtype=np.int64), 1)
        if stop.done():
            seen.append(stop.samples)
            break
    assert seen == [-(-min_samples // CHUNK) * CHUNK]  # the first chunk boundary with enough samples
    assert stop.to_json()["samples"] == seen[0] and stop.to_json()["of"] == 64


@pytest.mark.parametrize("target", [None, 0.9959])
def test_no_target_or_a_mean_near_the_target_judges_the_whole_split(target) -> None:
    rng = np.random.default_rng(0)
    stop = EarlyStop(target, 64)
    for _sample in range(64):
        assert not stop.done()
        stop.add(0.996 + rng.normal(0, 0.004, 3), np.zeros(3, dtype=np.int64), 1)
    assert not stop.done() and stop.to_json()["rule"] == "whole split"


def _data(samples: int = 64) -> CalibrationData:
    x = np.random.default_rng(0).normal(0, 1, (64 + samples, 4, DIM)).astype(np.float32)
    return CalibrationData({"x": x[:64]}, {"x": x[64:]}, batch=8, source="seeded normal")


def _perturbed(model: onnx.ModelProto) -> onnx.ModelProto:
    """The MLP with 5% noise on its first weight: a candidate below cosine 1, as a quantized file is."""
    from onnx import numpy_helper

    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    weight = copy.graph.initializer[0]
    array = numpy_helper.to_array(weight)
    noise = np.random.default_rng(2).normal(0, 0.05 * float(np.abs(array).mean()), array.shape)
    weight.CopyFrom(numpy_helper.from_array((array + noise).astype(array.dtype), weight.name))
    return copy


def test_the_judge_stops_on_the_first_chunk_and_makes_only_its_references(tmp_path) -> None:
    model = mlp_with_outlier()
    path = tmp_path / "fp32.onnx"
    onnx.save(model, path)
    candidate = _perturbed(model)
    judge = int8.Judge(path, _data(), 16, None)
    reference, calls = judge.reference, []
    judge.reference = lambda feeds: calls.append(len(feeds["x"])) or reference(feeds)
    cosine = judge.heldout_cosine(candidate, fake_quant=True, target=0.5)
    assert sum(calls) == CHUNK and judge.last_heldout["samples"] == CHUNK
    assert judge.last_heldout["lower_bound"] >= 0.5
    # what it judged is the split's first CHUNK samples: the whole-split number on a split of just those
    first = int8.Judge(path, _data(CHUNK), 16, None).heldout_cosine(candidate, fake_quant=True)
    assert cosine == pytest.approx(first, abs=1e-12) and cosine < 1.0


def test_a_target_the_candidate_cannot_clear_judges_every_sample_with_the_old_number(tmp_path) -> None:
    model = mlp_with_outlier()
    path = tmp_path / "fp32.onnx"
    onnx.save(model, path)
    candidate = _perturbed(model)
    whole = int8.Judge(path, _data(), 16, None).heldout_cosine(candidate, fake_quant=True)
    judge = int8.Judge(path, _data(), 16, None)
    assert judge.heldout_cosine(candidate, fake_quant=True, target=0.999999) == pytest.approx(
        whole, abs=1e-12
    )
    assert judge.last_heldout["samples"] == 64 and judge.last_heldout["rule"] == "whole split"


def test_judge_batches_in_chunks_hold_the_first_samples_of_each_chunk() -> None:
    rng = np.random.default_rng(1)
    samples, seq = 48, 12
    lengths = rng.integers(1, seq + 1, samples)
    mask = (np.arange(seq)[None, :] < lengths[:, None]).astype(np.int64)
    ids = np.arange(samples)[:, None] * 100 + np.arange(seq)[None, :]  # sample id recoverable
    data = CalibrationData({}, {"input_ids": ids, "attention_mask": mask}, batch=2, source="test")
    batches = data.judge_batches("heldout", None, 8, chunk=16)
    seen = [int(row[0]) // 100 for feeds in batches for row in feeds["input_ids"]]
    for start in range(0, samples, 16):
        chunk = seen[start : start + 16]
        assert sorted(chunk) == list(range(start, start + 16))  # exactly the chunk's samples
        assert list(lengths[chunk]) == sorted(lengths[chunk])  # sorted by length within it
    whole = data.judge_batches("heldout", None, 8)  # no chunk: sorted across the split, as before
    assert [int(r[0]) // 100 for f in whole for r in f["input_ids"]] == list(
        np.argsort(lengths, kind="stable")
    )
    with pytest.raises(ValueError, match="multiple of the batch"):
        data.judge_batches("heldout", None, 8, chunk=12)


def test_chunk_is_a_multiple_of_the_judge_batch() -> None:
    assert early_stop.CHUNK % int8.JUDGE_BATCH == 0 and early_stop.MIN_SAMPLES % early_stop.CHUNK == 0
