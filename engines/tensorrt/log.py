"""TensorRT's builder log, read for what the report needs: which layers could use 2:4 sparse
kernels and which ones the builder actually picked.

With SPARSE_WEIGHTS, TensorRT logs at INFO level
    (Sparsity) Layers eligible for sparse math: MatMul_51, Conv_3 + Relu_4
    (Sparsity) TRT inference plan picked sparse implementation for layers: MatMul_51
TensorRT times sparse and dense tactics and keeps the faster: eligible but not picked is the
common "2:4 gives no speedup" case (TensorRT #4065, #2169), and the report must show it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

ELIGIBLE_MARKER = "(Sparsity) Layers eligible for sparse math:"
PICKED_MARKER = "(Sparsity) TRT inference plan picked sparse implementation for layers:"


@dataclasses.dataclass
class SparsityReport:
    eligible: list[str] = dataclasses.field(default_factory=list)
    picked: list[str] = dataclasses.field(default_factory=list)

    @property
    def eligible_not_picked(self) -> list[str]:
        return [layer for layer in self.eligible if layer not in set(self.picked)]

    def to_json(self) -> dict[str, object]:
        return {
            "eligible": self.eligible,
            "picked": self.picked,
            "eligible_not_picked": self.eligible_not_picked,
        }


def _layers(text: str) -> list[str]:
    return [layer.strip() for layer in text.split(",") if layer.strip()]


def parse_sparsity_log(lines: Iterable[str]) -> SparsityReport:
    """Collect the sparse layer lists from builder log messages (any prefix before the marker)."""
    report = SparsityReport()
    for line in lines:
        for marker, target in ((ELIGIBLE_MARKER, report.eligible), (PICKED_MARKER, report.picked)):
            if marker in line:
                target.extend(_layers(line.split(marker, 1)[1]))
    return report
