"""Automatic sensitive-layer exclusion: keep the layers that hurt accuracy most in high precision.

Each candidate layer is quantized alone and the output's mean token cosine vs fp32 is measured on a subset
of the calibration samples: 1 - cosine is that layer's contribution to the error. Then, starting from
"everything quantized", the worst layers are kept in high precision one by one until the cosine reaches the
search target, or the budget of excluded layers is spent. Quantizing layers one at a time ignores
interactions, so the greedy loop measures the real combined model after every step instead of trusting sums.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence

logger = logging.getLogger(__name__)

# evaluate(excluded node names) -> mean token cosine vs fp32 of the model quantized except those nodes
Evaluate = Callable[[frozenset[str]], float]


@dataclasses.dataclass
class SensitivityResult:
    excluded: list[str]
    cosine: float  # on the search samples, with `excluded` in high precision
    all_quantized_cosine: float
    layer_error: dict[str, float]  # node -> 1 - cosine when only that node is quantized
    trace: list[dict[str, object]]  # one entry per greedy step
    met: bool

    def to_json(self) -> dict[str, object]:
        worst = sorted(self.layer_error.items(), key=lambda kv: -kv[1])
        return {
            "excluded": self.excluded,
            "cosine": self.cosine,
            "all_quantized_cosine": self.all_quantized_cosine,
            "met": self.met,
            "layer_error_worst_first": [{"node": n, "error": e} for n, e in worst],
            "trace": self.trace,
        }


def search(
    candidates: Sequence[str], evaluate: Evaluate, target: float, max_excluded: int
) -> SensitivityResult:
    """Greedy worst-first exclusion until `evaluate` reaches `target` or `max_excluded` layers are excluded."""
    everything = frozenset(candidates)
    all_quantized = evaluate(frozenset())
    trace: list[dict[str, object]] = [{"excluded": 0, "cosine": all_quantized}]
    if all_quantized >= target:
        return SensitivityResult([], all_quantized, all_quantized, {}, trace, met=True)
    layer_error = {}
    for name in candidates:
        layer_error[name] = 1.0 - evaluate(everything - {name})
        logger.debug("sensitivity %s: %.5f", name, layer_error[name])
    order = sorted(candidates, key=lambda n: -layer_error[n])
    excluded: list[str] = []
    cosine = all_quantized
    for name in order[:max_excluded]:
        excluded.append(name)
        cosine = evaluate(frozenset(excluded))
        trace.append({"excluded": len(excluded), "node": name, "cosine": cosine})
        logger.info("sensitivity: %d layers in high precision -> cosine %.5f", len(excluded), cosine)
        if cosine >= target:
            break
    return SensitivityResult(excluded, cosine, all_quantized, layer_error, trace, met=cosine >= target)
