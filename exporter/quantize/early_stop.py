"""When a held-out judge may stop: the mean token cosine is clear of its target with high confidence.

The held-out split is shuffled when it is made (exporter/quantize/calibration.py `split`), and the judge reads
it in chunks of `CHUNK` samples (`CalibrationData.judge_batches(chunk=...)`): after k chunks it has judged
exactly the first k * `CHUNK` samples, a random subset. The statistic is the one the gate and the report use,
the mean over judged tokens, a ratio of sums over samples (tokens of one sample are not independent: the
sample is the unit). Its standard error is the delta method's for a ratio estimator:
SE = sqrt(sum_i (S_i - M * T_i)^2 / (n (n - 1))) / mean(T), with S_i the sum of sample i's token cosines, T_i
its token count and M = sum S / sum T. The judge stops once at least `MIN_SAMPLES` samples are judged and
M - `Z` * SE >= target (one-sided, `Z` = 3.09: 0.1% of stopping on a split whose full mean misses the target
by more than the noise). A split near or under its target is judged whole, as before: the rule only ever
shortens a judge whose verdict is already certain.
Measured on the 45M Llama (tools/bench_decoder.py, 64 held-out samples): README, "held-out judge".
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

CHUNK = 16  # samples per chunk: a multiple of exporter/quantize/int8.py JUDGE_BATCH
MIN_SAMPLES = 16
Z = 3.09  # one-sided 99.9%


@dataclasses.dataclass
class EarlyStop:
    """Token cosines, and per-sample sums and token counts, batch by batch; `done()` says when to stop."""

    target: float | None  # None: never stop early (the whole split is judged)
    total_samples: int
    cosines: list[np.ndarray] = dataclasses.field(default_factory=list)
    sums: list[float] = dataclasses.field(default_factory=list)
    tokens: list[int] = dataclasses.field(default_factory=list)
    judged: int = 0  # samples judged without a target (with one: len(sums))

    def add(self, cosines: np.ndarray, sample_of_token: np.ndarray | None, samples: int) -> None:
        """One batch: the cosine of each judged token and the batch row (sample) it belongs to (needed only
        with a target)."""
        self.cosines.append(cosines)
        if self.target is not None:  # the statistics only a stopping rule reads
            assert sample_of_token is not None
            self.sums.extend(np.bincount(sample_of_token, weights=cosines, minlength=samples).tolist())
            self.tokens.extend(np.bincount(sample_of_token, minlength=samples).tolist())
        else:
            self.judged += samples

    @property
    def samples(self) -> int:
        return len(self.sums) if self.target is not None else self.judged

    def mean(self) -> float:
        """The mean over every judged token (the numbers the judge always reported)."""
        return float(np.mean(np.concatenate(self.cosines))) if self.cosines else float("nan")

    def lower_bound(self) -> float:
        """M - Z * SE over the samples judged so far (those with at least one token); -inf under two."""
        judged = [(s, t) for s, t in zip(self.sums, self.tokens, strict=True) if t > 0]
        n = len(judged)
        if n < 2:
            return float("-inf")
        sums, tokens = np.array([s for s, _ in judged]), np.array([t for _, t in judged], dtype=np.float64)
        mean = sums.sum() / tokens.sum()
        se = math.sqrt(float(np.sum((sums - mean * tokens) ** 2)) / (n * (n - 1))) / float(tokens.mean())
        return float(mean - Z * se)

    def done(self) -> bool:
        """At a chunk boundary, with enough samples, and clear of the target (never before the split's end
        when there is no target)."""
        if self.target is None or self.samples >= self.total_samples:
            return False
        if self.samples < MIN_SAMPLES or self.samples % CHUNK:
            return False
        return self.lower_bound() >= self.target

    def to_json(self) -> dict[str, object]:
        return {
            "samples": self.samples,
            "of": self.total_samples,
            "lower_bound": self.lower_bound() if self.samples < self.total_samples else None,
            "rule": f"stopped when mean - {Z} x SE >= {self.target} (samples as units, chunks of {CHUNK})"
            if self.samples < self.total_samples
            else "whole split",
        }
