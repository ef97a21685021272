"""Shape inference: annotate every value with its dtype and (symbolic) shape.

The fusion checks read ranks and dims (e.g. a bias must be 1-D, a mask 4-D), so this runs after
cleanup and before fusion. Uses onnx-ir's ShapeInferencePass (ONNX's inference, contrib ops skipped)."""

from __future__ import annotations

import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from graph_passes.base import GraphPass, PassReport


class InferShapes(GraphPass):
    name = "infer-shapes"

    def apply(self, model: ir.Model, report: PassReport) -> None:
        known_before = _count_typed(model)
        common_passes.ShapeInferencePass()(model)
        gained = _count_typed(model) - known_before
        if gained:
            report.counts["values_typed"] = gained


def _count_typed(model: ir.Model) -> int:
    return sum(
        1
        for node in ir.traversal.RecursiveGraphIterator(model.graph)
        for value in node.outputs
        if value.shape is not None and value.dtype is not None
    )
