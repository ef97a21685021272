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


def compare(
    name: str, reference: np.ndarray, candidate: np.ndarray, rows: np.ndarray | None = None
) -> Comparison:
    """Statistics in float64, computed over blocks of rows of the [-1, last axis] view: max abs error and
    where, mean abs error, per-row cosine. The max abs error and where are those of the whole array; the
    sums (mean abs error grouped by block, each row's dot products by einsum) may differ from numpy's
    pairwise sums of whole float64 copies in the last bits (~1e-16 relative; 1.6x faster on [8, 128, 32000]
    logits). `rows`: only these rows of that view, as if they had been selected first (`reference[mask]` for
    a mask over all but the last axis; indices are into the selection), without copying them out."""
    if reference.shape != candidate.shape:
        raise ValidationError(
            f"{name}: shape {candidate.shape} differs from the reference's {reference.shape}"
        )
    flat_ref = reference.reshape(-1, reference.shape[-1])
    flat_cand = candidate.reshape(-1, candidate.shape[-1])
    if rows is None and not np.all(np.isfinite(candidate)):
        raise ValidationError(f"{name}: non-finite values in the output")
    count, columns = (len(rows), flat_ref.shape[1]) if rows is not None else flat_ref.shape
    step = max(1, BLOCK_ELEMENTS // max(columns, 1))
    cosine = np.empty(count, dtype=np.float64)
    total, worst, worst_at = 0.0, -np.inf, 0
    buffers = np.empty((3, min(step, count), columns), dtype=np.float64)
    for start in range(0, count, step):
        block = slice(start, start + step) if rows is None else rows[start : start + step]
        block_ref, block_cand = flat_ref[block], flat_cand[block]  # views, or one gather of the rows
        if rows is not None and not np.all(np.isfinite(block_cand)):
            raise ValidationError(f"{name}: non-finite values in the output")
        # float64 copies of one block into reused buffers (fresh ones cost page faults), then float64 only
        ref, cand, diff = (b[: len(block_ref)] for b in buffers)
        np.copyto(ref, block_ref)
        np.copyto(cand, block_cand)
        np.subtract(ref, cand, out=diff)
        np.abs(diff, out=diff)
        at = int(
            np.argmax(diff)
        )  # the first maximum (a NaN of the reference counts as one, as argmax has it)
        if diff.flat[at] > worst or (np.isnan(diff.flat[at]) and not np.isnan(worst)):
            worst, worst_at = float(diff.flat[at]), start * columns + at
        total += float(diff.sum())
        norms = np.sqrt(np.einsum("ij,ij->i", ref, ref)) * np.sqrt(np.einsum("ij,ij->i", cand, cand))
        cosine[start : start + len(ref)] = np.einsum("ij,ij->i", ref, cand) / np.maximum(norms, 1e-30)
    shape = reference.shape if rows is None else (count, columns)
    where = tuple(int(i) for i in np.unravel_index(worst_at, shape))
    return Comparison(
        name, worst, total / (count * columns), float(cosine.mean()), float(cosine.min()), where
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
        if token_mask is None:
            results.append(compare(name, ref, cand))
        elif (
            ref.shape == cand.shape and ref.ndim == token_mask.ndim + 1 and ref.shape[:-1] == token_mask.shape
        ):
            # the mask selects whole rows of the [-1, last axis] view: compared in place
            results.append(compare(name, ref, cand, np.flatnonzero(token_mask.reshape(-1))))
        else:
            results.append(compare(name, ref[token_mask], cand[token_mask]))
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
