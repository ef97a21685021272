"""exporter/validate/compare.py: the blocked float64 statistics equal the whole-array float64 ones (the max abs
error and where exactly; the sums to float64 rounding)."""

from __future__ import annotations

import numpy as np
import pytest

from export_errors import ValidationError
from exporter.validate import compare as compare_module
from exporter.validate.compare import compare


def _whole_array(reference: np.ndarray, candidate: np.ndarray) -> tuple[float, float, float, float, tuple]:
    """The statistics as computed before blocking: whole float64 copies."""
    ref, cand = reference.astype(np.float64), candidate.astype(np.float64)
    diff = np.abs(ref - cand)
    flat_ref, flat_cand = ref.reshape(-1, ref.shape[-1]), cand.reshape(-1, cand.shape[-1])
    norms = np.linalg.norm(flat_ref, axis=1) * np.linalg.norm(flat_cand, axis=1)
    cosine = np.sum(flat_ref * flat_cand, axis=1) / np.maximum(norms, 1e-30)
    worst = tuple(int(i) for i in np.unravel_index(int(np.argmax(diff)), diff.shape))
    return float(diff.max()), float(diff.mean()), float(cosine.mean()), float(cosine.min()), worst


@pytest.mark.parametrize("shape", [(3, 5, 7), (40, 1000), (2, 9, 300), (7,)])
@pytest.mark.parametrize("block", [64, 1 << 18])
def test_blocks_equal_whole_array(
    shape: tuple[int, ...], block: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(compare_module, "BLOCK_ELEMENTS", block)
    rng = np.random.default_rng(1)
    reference = rng.standard_normal(shape).astype(np.float32) * 4
    candidate = reference + rng.standard_normal(shape).astype(np.float32) * 1e-3
    # a tie for the largest error, in two different blocks: the first one is reported
    for index in (1, -1):
        reference.reshape(-1)[index], candidate.reshape(-1)[index] = 0.5, 1.5
    result = compare("logits", reference, candidate)
    max_abs, mean_abs, mean_cos, min_cos, worst = _whole_array(reference, candidate)
    assert (result.max_abs, result.worst_index) == (max_abs, worst)
    assert result.worst_index == tuple(np.unravel_index(1, shape))
    # each row's dot products summed by einsum, not numpy's pairwise sum: float64 rounding apart, the same
    assert result.mean_cosine == pytest.approx(mean_cos, rel=1e-13, abs=1e-15)
    assert result.min_cosine == pytest.approx(min_cos, rel=1e-13, abs=1e-15)
    assert result.mean_abs == pytest.approx(mean_abs, rel=1e-13)  # the sum is grouped by block


def test_non_finite_and_shape_errors() -> None:
    reference = np.zeros((2, 3), dtype=np.float32)
    bad = reference.copy()
    bad[1, 2] = np.nan
    with pytest.raises(ValidationError, match="non-finite"):
        compare("logits", reference, bad)
    with pytest.raises(ValidationError, match="shape"):
        compare("logits", reference, reference[:1])


def test_token_mask_rows_equal_selected_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    """A [batch, sequence] mask over [batch, sequence, vocab] outputs: compared in place, the same numbers (and
    index into the selection) as comparing `output[mask]`; a non-finite value at a padded position is ignored."""
    monkeypatch.setattr(compare_module, "BLOCK_ELEMENTS", 100)
    rng = np.random.default_rng(2)
    reference = rng.standard_normal((3, 6, 40)).astype(np.float32)
    candidate = reference + rng.standard_normal((3, 6, 40)).astype(np.float32) * 1e-2
    mask = rng.random((3, 6)) > 0.4
    candidate[~mask] = np.inf  # padding: not part of the comparison
    (in_place,) = compare_module.compare_all({"logits": reference}, {"logits": candidate}, {"logits": mask})
    selected = compare("logits", reference[mask], candidate[mask])
    assert in_place == selected
    assert len(in_place.worst_index) == 2
    candidate[mask.nonzero()[0][0], mask.nonzero()[1][0], 5] = np.nan
    with pytest.raises(ValidationError, match="non-finite"):
        compare_module.compare_all({"logits": reference}, {"logits": candidate}, {"logits": mask})
