"""LayerNormalization fusion (both targets: LayerNormalization is standard ONNX since opset 17).

Identity: for D = x - mean(x) over the last axis,
    LayerNorm(x) = D / sqrt(mean(D²) + eps) * gamma (+ beta)
so the chain ReduceMean / Sub / Pow 2 (or D·D) / ReduceMean / Add eps / Sqrt / Div (or ·Reciprocal) /
Mul gamma [/ Add beta] is `LayerNormalization(x, gamma, beta, axis=-1, epsilon=eps)`.
Both ReduceMean forms are matched: axes as attribute (opset ≤ 17, what our exporter writes) and as input
(opset ≥ 18). Our TorchScript exports already carry native LayerNormalization; this catches graphs that
do not (older exporters, hand-written models) and folds a trailing bias Add into the native op.
"""

from __future__ import annotations

from collections.abc import Sequence

import onnx_ir as ir
from onnxscript.rewriter import pattern

from graph_passes._rules import RewriteRulesPass, constant_array, scalar_value


def reduces_last_axis(node: ir.Node) -> bool:
    """ReduceMean over exactly the last axis, keeping dims (axes as attribute or as input)."""
    if node.attributes.get_int("keepdims", 1) != 1:
        return False
    axes_attr = node.attributes.get_ints("axes")
    axes = list(axes_attr) if axes_attr is not None else None
    if axes is None and len(node.inputs) > 1:
        array = constant_array(node.inputs[1])
        axes = None if array is None else [int(a) for a in array.reshape(-1)]
    if axes != [-1]:
        rank = node.inputs[0].shape.rank() if node.inputs[0].shape is not None else None
        return rank is not None and axes == [rank - 1]
    return True


class LayerNormFusion(pattern.RewriteRuleClassBase):
    def __init__(self, name: str, square: str, normalize: str) -> None:
        super().__init__(name)
        self._square, self._normalize = square, normalize

    def pattern(self, op, x, gamma, eps):  # type: ignore[no-untyped-def]
        mean = op.ReduceMean(x, _allow_other_inputs=True, _outputs=["mean"])
        d = op.Sub(x, mean)
        d2 = op.Pow(d, 2.0) if self._square == "pow" else op.Mul(d, d)
        var = op.ReduceMean(d2, _allow_other_inputs=True, _outputs=["var"])
        std = op.Sqrt(op.Add(var, eps))
        normalized = op.Div(d, std) if self._normalize == "div" else op.Mul(d, op.Reciprocal(std))
        return op.Mul(normalized, gamma)

    def check(self, context, x, gamma, eps, mean, var, **_) -> pattern.MatchResult:  # type: ignore[no-untyped-def]
        result = pattern.MatchResult()
        if not (reduces_last_axis(mean.producer()) and reduces_last_axis(var.producer())):
            return result.fail("ReduceMean is not over the last axis only with keepdims=1")
        if scalar_value(eps) is None:
            return result.fail("epsilon is not a constant scalar", eps)
        if gamma.shape is None or gamma.shape.rank() != 1:
            return result.fail("gamma is not known to be 1-D", gamma)
        if x.dtype not in (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16):
            return result.fail(f"input dtype {x.dtype} is not a float type", x)
        return result

    def rewrite(self, op, x, gamma, eps, **_):  # type: ignore[no-untyped-def]
        return op.LayerNormalization(x, gamma, axis=-1, epsilon=scalar_value(eps))


class LayerNormBiasFusion(pattern.RewriteRuleClassBase):
    """LayerNormalization(x, gamma) + beta -> LayerNormalization(x, gamma, beta)."""

    def pattern(self, op, x, gamma, beta):  # type: ignore[no-untyped-def]
        return op.Add(op.LayerNormalization(x, gamma, _outputs=["ln"]), beta)

    def check(self, context, beta, ln, **_) -> pattern.MatchResult:  # type: ignore[no-untyped-def]
        result = pattern.MatchResult()
        if len(ln.producer().outputs) != 1:
            return result.fail("LayerNormalization has mean/inv-std outputs in use")
        if beta.shape is None or beta.shape.rank() != 1:
            return result.fail("bias is not known to be 1-D", beta)
        return result

    def rewrite(self, op, x, gamma, beta, ln, **_):  # type: ignore[no-untyped-def]
        return op.LayerNormalization(x, gamma, beta, **ln.producer().attributes)


def layernorm_rules() -> list[pattern.RewriteRule]:
    rules = []
    for square in ("pow", "mul"):
        for normalize in ("div", "reciprocal"):
            rules += LayerNormFusion.rule(f"LayerNorm[{square},{normalize}]", square, normalize).commute()
    return rules + LayerNormBiasFusion.rule("LayerNormBias").commute()


class FuseLayerNorm(RewriteRulesPass):
    name = "fuse-layernorm"

    def rules(self) -> Sequence[pattern.RewriteRule]:
        return layernorm_rules()
