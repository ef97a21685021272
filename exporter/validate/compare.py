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


def compare(name: str, reference: np.ndarray, candidate: np.ndarray) -> Comparison:
    if reference.shape != candidate.shape:
        raise ValidationError(
            f"{name}: shape {candidate.shape} differs from the reference's {reference.shape}"
        )
    ref = reference.astype(np.float64)
    cand = candidate.astype(np.float64)
    diff = np.abs(ref - cand)
    if not np.all(np.isfinite(cand)):
        raise ValidationError(f"{name}: non-finite values in the output")
    flat_ref = ref.reshape(-1, ref.shape[-1])
    flat_cand = cand.reshape(-1, cand.shape[-1])
    norms = np.linalg.norm(flat_ref, axis=1) * np.linalg.norm(flat_cand, axis=1)
    cosine = np.sum(flat_ref * flat_cand, axis=1) / np.maximum(norms, 1e-30)
    worst = tuple(int(i) for i in np.unravel_index(int(np.argmax(diff)), diff.shape))
    return Comparison(
        name, float(diff.max()), float(diff.mean()), float(cosine.mean()), float(cosine.min()), worst
    )


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
