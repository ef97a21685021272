"""Numeric comparison of outputs against a reference, with the tolerance table, failing loudly.

Statistics per output: max abs error (and where it is), mean abs error, and mean cosine over the
last axis (per token for hidden states / logits). `check` raises ValidationError with the numbers
when a bound from exporter/validate/tolerances.py is broken: never warn and carry on.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np

from export_errors import ValidationError
from exporter.validate.tolerances import tolerance


@dataclasses.dataclass
class Comparison:
    output: str
    max_abs: float
    mean_abs: float
    mean_cosine: float
    min_cosine: float
    worst_index: tuple[int, ...]

    def to_json(self) -> dict[str, object]:
        return dataclasses.asdict(self)


# Elements per float64 block of `compare`: temporaries of a few MB stay in cache, where whole float64 copies
# of a decoder's [tokens, 32k vocabulary] logits (hundreds of MB each) cost ~1 s per comparison in page faults
# and memory traffic.
BLOCK_ELEMENTS = 1 << 18


def compare(name: str, reference: np.ndarray, candidate: np.ndarray) -> Comparison:
    """Statistics in float64, computed over blocks of rows of the [-1, last axis] view: max abs error and
    where, mean abs error, per-row cosine. Each row's numbers are computed as on the whole array; only the
    mean abs error's sum is grouped by block (float64 rounding, ~1e-16 relative)."""
    if reference.shape != candidate.shape:
        raise ValidationError(
            f"{name}: shape {candidate.shape} differs from the reference's {reference.shape}"
        )
    if not np.all(np.isfinite(candidate)):
        raise ValidationError(f"{name}: non-finite values in the output")
    flat_ref = reference.reshape(-1, reference.shape[-1])
    flat_cand = candidate.reshape(-1, candidate.shape[-1])
    rows, columns = flat_ref.shape
    step = max(1, BLOCK_ELEMENTS // max(columns, 1))
    cosine = np.empty(rows, dtype=np.float64)
    total, worst, worst_at = 0.0, -np.inf, 0
    for start in range(0, rows, step):
        ref = flat_ref[start : start + step].astype(np.float64)
        cand = flat_cand[start : start + step].astype(np.float64)
        diff = np.abs(ref - cand)
        at = int(
            np.argmax(diff)
        )  # the first maximum (a NaN of the reference counts as one, as argmax has it)
        if diff.flat[at] > worst or (np.isnan(diff.flat[at]) and not np.isnan(worst)):
            worst, worst_at = float(diff.flat[at]), start * columns + at
        total += float(diff.sum())
        norms = np.linalg.norm(ref, axis=1) * np.linalg.norm(cand, axis=1)
        cosine[start : start + step] = np.sum(ref * cand, axis=1) / np.maximum(norms, 1e-30)
    where = tuple(int(i) for i in np.unravel_index(worst_at, reference.shape))
    return Comparison(name, worst, total / flat_ref.size, float(cosine.mean()), float(cosine.min()), where)


def compare_all(
    reference: Mapping[str, np.ndarray],
    candidate: Mapping[str, np.ndarray],
    masks: Mapping[str, np.ndarray] | None = None,
) -> list[Comparison]:
    """Compare every reference output. `masks` (output -> bool per token) restricts token-level
    outputs to real tokens: padded positions of an encoder are not part of the function's contract."""
    results = []
    for name, ref in reference.items():
        cand = candidate[name]
        token_mask = (masks or {}).get(name)
        if token_mask is not None:
            ref, cand = ref[token_mask], cand[token_mask]
        results.append(compare(name, ref, cand))
    return results


def check(comparisons: list[Comparison], dtype: str, what: str) -> None:
    """Raise ValidationError naming `what`, the output and the numbers when out of tolerance."""
    tol = tolerance(dtype)
    for c in comparisons:
        if tol.max_abs is not None and c.max_abs > tol.max_abs:
            raise ValidationError(
                f"{what}: output {c.output!r} max abs error {c.max_abs:.3g} > {tol.max_abs:g} ({dtype} tolerance) "
                f"at index {c.worst_index}; mean abs {c.mean_abs:.3g}, mean cosine {c.mean_cosine:.6f}"
            )
        if tol.min_mean_cosine is not None and c.mean_cosine < tol.min_mean_cosine:
            raise ValidationError(
                f"{what}: output {c.output!r} mean cosine {c.mean_cosine:.5f} < {tol.min_mean_cosine} ({dtype} target); "
                f"max abs error {c.max_abs:.3g} at {c.worst_index}"
            )
