"""Shared machinery for fusion passes built on onnxscript's pattern rewriter.

A fusion pass is a set of onnxscript rewrite rules (pattern / check / rewrite) plus a name. Running it
records, besides the op-count delta, *why* a rule did not fire: onnxscript's `MatchingTracer` keeps
the best partial match of every rule with the reason its pattern or `check` gave, and we copy those
reasons (with the layer of the node they were found at) into the pass report. The pipeline uses them
to explain every expected fusion that did not happen.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common_passes
from onnxscript.rewriter import pattern
from onnxscript.rewriter._basics import MatchingTracer, MatchStatus

from graph_passes.base import GraphPass, PassReport, op_counts

_LAYER_RE = re.compile(r"layers?[./_](\d+)[./_]")


def layer_of(node: ir.Node) -> str:
    """The transformer layer a node belongs to ("0", "1", ...) or "other".

    The TorchScript exporter names nodes and values after the module path (`/model/encoder/layer.3/...`);
    fused nodes keep the output value names of the nodes they replace, so we look there too."""
    first_output = (node.outputs[0].name or "") if node.outputs else ""
    for name in (node.name or "", first_output):
        match = _LAYER_RE.search(name + "/")
        if match:
            return match.group(1)
    if first_output.startswith("/"):
        return "other"  # an exporter module path outside the layers (embeddings, final norm)
    for value in node.inputs:
        match = _LAYER_RE.search((value.name or "") + "/") if value is not None else None
        if match:
            return match.group(1)
    return "other"


def count_delta(before: Counter[str], after: Counter[str]) -> dict[str, int]:
    """Op type -> (after - before), non-zero entries only."""
    keys = set(before) | set(after)
    return {k: after[k] - before[k] for k in sorted(keys) if after[k] != before[k]}


def constant_array(value: ir.Value | None) -> np.ndarray | None:
    """The numpy value of an initializer / Constant output, else None."""
    if value is None:
        return None
    const = ir.convenience.get_const_tensor(value)
    return None if const is None else const.numpy()


def head_size_from_reshape(shape: ir.Value) -> int | None:
    """The last entry of a Reshape target [B, S, -1, head_size]: a constant, or the last input of the
    Concat the exporter builds it with. Head counts are derived from it and the projection width, so a
    head-pruned layer gets its own count whatever config.json says."""
    array = constant_array(shape)
    if array is None:
        node = shape.producer()
        if node is None or node.op_type != "Concat" or not node.inputs:
            return None
        array = constant_array(node.inputs[-1])
    if array is None or array.size < 1:
        return None
    last = int(array.reshape(-1)[-1])
    return last if last > 0 else None


def attention_bias_problem(mask: ir.Value) -> str | None:
    """Why `mask` cannot be ONNX Runtime's `attention_bias` ([B or 1, 1, S, T]: 4-D, head axis 1), or None."""
    if mask.shape is None or mask.shape.rank() != 4:
        return "additive mask is not 4-D [B or 1, 1, S, T]"
    heads = mask.shape[1]
    if heads not in (1, None) and not isinstance(heads, ir.SymbolicDim):
        return f"additive mask has {heads} on its head axis; ONNX Runtime takes [B or 1, 1, S, T]"
    return None


def scalar_value(value: ir.Value | None) -> float | None:
    """A constant holding exactly one number, as a float; else None."""
    array = constant_array(value)
    if array is None or array.size != 1:
        return None
    return float(array.reshape(-1)[0])


class RewriteRulesPass(GraphPass):
    """A pass that applies a set of onnxscript rewrite rules and reports counts and failure reasons."""

    name = "rewrite-rules"

    def rules(self) -> Sequence[pattern.RewriteRule]:
        raise NotImplementedError

    def apply(self, model: ir.Model, report: PassReport) -> None:
        before = op_counts(model)
        rule_set = pattern.RewriteRuleSet([dispatch_on_root(rule) for rule in self.rules()])
        applied = rule_set.apply_to_model(model)
        common_passes.RemoveUnusedNodesPass()(model)
        if applied:
            # Rewrites that build new weights (packed QKV) emit Constant nodes: keep them as initializers.
            common_passes.LiftConstantsToInitializersPass(lift_all_constants=False, size_limit=16)(model)
        # A tracer makes onnxscript match without rewriting: a second, read-only sweep collects the
        # reasons why the rules did not fire on what is left.
        tracer = MatchingTracer()
        rule_set.apply_to_model(model, tracer=tracer)
        report.counts = count_delta(before, op_counts(model))
        if applied:
            report.counts["applied"] = applied
        report.details.extend(_failure_reasons(tracer))


def dispatch_on_root(rule: pattern.RewriteRule) -> pattern.RewriteRule:
    """`rule`, trying to match only at nodes of its pattern's root op type and domain (changed in place).

    onnxscript tries every rule at every node; a node whose op type or domain differs from the pattern's root
    (output) node fails at once with no node matched, which its tracer does not record (score 0). So
    skipping those attempts changes neither the rewrites nor the failure reasons, and on a decoder of ~5,000
    nodes with ~100 commuted rules it removes nearly all of the ~500,000 attempts (tests pin the same graph
    and reasons). Rules with another matcher than onnxscript's default are left as they are."""
    try:  # onnxscript's private names (0.7): a version without them keeps the rule as it is
        from onnxscript.rewriter._matcher import SimplePatternMatcher
        from onnxscript.rewriter._pattern_ir import StringConstantPattern

        if type(rule._matcher) is not SimplePatternMatcher:
            return rule
        root = rule._target_pattern.output_nodes[0]
        op_matches, domain_matches = root.op.matches, root.domain.matches
        constant = type(root.op) is StringConstantPattern and type(root.domain) is StringConstantPattern
        op_type, domain = (root.op.value(), root.domain.value()) if constant else ("", "")
    except (ImportError, AttributeError, IndexError):
        return rule
    try_rewrite = rule.try_rewrite

    def at_root(model: ir.Model, graph: ir.Graph | ir.Function, node: ir.Node, **kwargs: Any) -> Any:
        if not (op_matches(node.op_type) and domain_matches(node.domain)):
            return None
        return try_rewrite(model, graph, node, **kwargs)

    def at_constant_root(model: ir.Model, graph: ir.Graph | ir.Function, node: ir.Node, **kwargs: Any) -> Any:
        # the same test as `at_root` for a root that names one op type and domain, as two string
        # comparisons: it runs for every rule at every node (~400,000 times on the 45M Llama's fusion stage)
        if node.op_type != op_type or node.domain != domain:
            return None
        return try_rewrite(model, graph, node, **kwargs)

    rule.try_rewrite = at_constant_root if constant else at_root  # type: ignore[method-assign]
    return rule


def _failure_reasons(tracer: MatchingTracer) -> list[dict[str, str]]:
    """Best partial match per rule that did not succeed: rule, layer, node and the reason."""
    out = []
    for rule, matches in tracer.best_matches_map.items():
        for info in matches:
            if info.status == MatchStatus.SUCCESS:
                continue
            reason = info.match_result.reason or "pattern did not match"
            out.append(
                {
                    "rule": rule.name or type(rule).__name__,
                    "layer": layer_of(info.root_node),
                    "node": info.root_node.name or "",
                    "status": info.status.name,
                    "reason": str(reason),
                }
            )
    return out
