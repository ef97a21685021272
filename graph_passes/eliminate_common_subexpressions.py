"""Common-subexpression elimination: two nodes with the same op, attributes and inputs compute the same
value (ONNX ops are deterministic except the random ones, which onnx-ir's pass leaves alone), so one
of them is enough. The exporter repeats shape arithmetic per layer; this removes the repeats."""

from __future__ import annotations

import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from graph_passes._rules import count_delta
from graph_passes.base import GraphPass, PassReport, op_counts


class EliminateCommonSubexpressions(GraphPass):
    name = "eliminate-common-subexpressions"

    def apply(self, model: ir.Model, report: PassReport) -> None:
        before = op_counts(model)
        common_passes.CommonSubexpressionEliminationPass()(model)
        common_passes.RemoveUnusedNodesPass()(model)
        report.counts = count_delta(before, op_counts(model))
