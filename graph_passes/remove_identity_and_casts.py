"""Identity and redundant-cast removal.

- `Identity(x)` is x (onnx-ir's IdentityEliminationPass; graph outputs keep their names).
- `Cast(x, to=T)` where x is already of type T is x; `Cast(Cast(x, to=A), to=B)` is `Cast(x, to=B)` when
  the first cast cannot lose information needed by the second (onnxscript's cast rules).
"""

from __future__ import annotations

import onnx_ir as ir
import onnx_ir.passes.common as common_passes
from onnxscript.rewriter import pattern
from onnxscript.rewriter.rules.common import cast_cast_rule, no_op_cast_rule

from graph_passes._rules import count_delta
from graph_passes.base import GraphPass, PassReport, op_counts


class RemoveIdentityAndCasts(GraphPass):
    name = "remove-identity-and-casts"

    def apply(self, model: ir.Model, report: PassReport) -> None:
        before = op_counts(model)
        # Cast rules first: onnxscript rewrites a no-op Cast into an Identity, which the next step removes.
        pattern.RewriteRuleSet([no_op_cast_rule, cast_cast_rule]).apply_to_model(model)
        common_passes.IdentityEliminationPass()(model)
        common_passes.RemoveUnusedNodesPass()(model)
        report.counts = count_delta(before, op_counts(model))
