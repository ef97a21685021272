"""Dead-code removal: nodes whose outputs reach no graph output, unused initializers, functions, opsets.

Identity: removing a node nobody reads cannot change any output. Uses onnx-ir's common passes.
"""

from __future__ import annotations

import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from graph_passes._rules import count_delta
from graph_passes.base import GraphPass, PassReport, op_counts


class RemoveDeadNodes(GraphPass):
    name = "remove-dead-nodes"

    def apply(self, model: ir.Model, report: PassReport) -> None:
        before = op_counts(model)
        n_init = len(model.graph.initializers)
        common_passes.RemoveUnusedNodesPass()(model)
        common_passes.RemoveUnusedFunctionsPass()(model)
        common_passes.RemoveUnusedOpsetsPass()(model)
        report.counts = count_delta(before, op_counts(model))
        removed_init = n_init - len(model.graph.initializers)
        if removed_init:
            report.counts["initializers_removed"] = removed_init
