"""The pass framework: onnx-ir passes that also say what they changed.

onnx-ir's `PassResult` only says "modified or not". Deployment engineers need counts (how many
LayerNormalizations were fused, which weights were tagged 2:4), so every pass of ours returns a
`ReportedPassResult`: the onnx-ir result plus a `PassReport` with counts by op type and details.

Contract of a pass (tests check each one): running it twice changes nothing the second time;
an exception inside it is re-raised as `GraphPassError` naming the pass.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections import Counter
from typing import Any

import onnx_ir as ir
from onnx_ir.passes import InPlacePass, PassResult


class GraphPassError(RuntimeError):
    """A pass failed; the message starts with the pass name."""


@dataclasses.dataclass
class PassReport:
    """What one pass did: `counts` maps an op type or event to how often it happened."""

    name: str
    modified: bool = False
    counts: dict[str, int] = dataclasses.field(default_factory=dict)
    details: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        """What `dataclasses.asdict` gives (a copy), made faster: the details are JSON values (thousands of
        failure reasons on a decoder), copied as such instead of through asdict's deepcopy of every string."""
        return {
            "name": self.name,
            "modified": self.modified,
            "counts": dict(self.counts),
            "details": [_json_copy(detail) for detail in self.details],
            "seconds": self.seconds,
        }


@dataclasses.dataclass
class ReportedPassResult(PassResult):
    report: PassReport = dataclasses.field(default_factory=lambda: PassReport(name="?"))


class GraphPass(InPlacePass):
    """Base of our passes. Subclasses implement `apply(model, report)` and fill the report."""

    name: str = "graph-pass"

    def apply(self, model: ir.Model, report: PassReport) -> None:
        raise NotImplementedError

    def call(self, model: ir.Model) -> ReportedPassResult:
        report = PassReport(name=self.name)
        start = time.perf_counter()
        try:
            self.apply(model, report)
        except GraphPassError:
            raise
        except Exception as exc:  # re-raised with the pass name, cause kept
            raise GraphPassError(f"{self.name}: {exc}") from exc
        report.seconds = time.perf_counter() - start
        report.modified = report.modified or any(report.counts.values())
        return ReportedPassResult(model=model, modified=report.modified, report=report)


_ATOMS = (str, int, float, bool, type(None))


def _json_copy(value: Any) -> Any:
    """`value` copied as `dataclasses.asdict` copies a field's value: containers anew, immutable atoms shared."""
    if isinstance(value, _ATOMS):
        return value
    if type(value) is dict:
        return {_json_copy(k): _json_copy(v) for k, v in value.items()}
    if type(value) in (list, tuple):
        return type(value)(_json_copy(v) for v in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    return copy.deepcopy(value)


def op_counts(model: ir.Model) -> Counter[str]:
    """Op type -> count over the main graph and its subgraphs."""
    return Counter(node.op_type for node in ir.traversal.RecursiveGraphIterator(model.graph))
