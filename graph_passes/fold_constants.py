"""Constant folding: evaluate every node whose inputs are all constant and replace it by its value.

Uses onnxscript's constant folder (the one its optimizer runs), which also folds shape arithmetic
whose result is known statically (Shape of a value with a static dim, Gather on it, ...). Large
results stay as nodes (onnxscript's output size limit) so folding never bloats the file. Q/DQ nodes are
never folded, so running cleanup after Q/DQ insertion keeps the INT8 weights.
"""

from __future__ import annotations

import onnx_ir as ir
import onnx_ir.passes.common as common_passes
from onnxscript.optimizer import fold_constants

from graph_passes._rules import count_delta
from graph_passes.base import GraphPass, PassReport, op_counts


def _keep_qdq(node: ir.Node) -> bool | None:
    """Never fold Q/DQ: DequantizeLinear(int8 weight) is constant, but folding it would silently turn an
    INT8 weight back into fp32 (and TensorRT reads the Q/DQ pair as the quantization spec)."""
    return False if node.op_type in ("QuantizeLinear", "DequantizeLinear") else None


class FoldConstants(GraphPass):
    name = "fold-constants"

    def apply(self, model: ir.Model, report: PassReport) -> None:
        before = op_counts(model)
        fold_constants(model, should_fold=_keep_qdq)
        common_passes.RemoveUnusedNodesPass()(model)
        # Constant nodes are lifted to initializers so that a second run finds nothing to do.
        common_passes.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(model)
        report.counts = count_delta(before, op_counts(model))
