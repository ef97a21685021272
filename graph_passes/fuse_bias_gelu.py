"""Bias+GELU fusion (onnxruntime target): Gelu(x + b) -> BiasGelu(x, b); FastGelu(x + b) -> FastGelu(x, b).

The FFN's first Linear is MatMul + Add(bias) + GELU; ONNX Runtime's BiasGelu / FastGelu apply the bias
inside the activation kernel, saving one pass over the (batch·seq × ffn) tensor. The bias must be a
1-D vector over the last axis (checked), which is the only broadcast these kernels implement.
"""

from __future__ import annotations

from collections.abc import Sequence

from onnxscript.rewriter import pattern

from graph_passes._rules import RewriteRulesPass


class BiasGeluFusion(pattern.RewriteRuleClassBase):
    def __init__(self, name: str, op_type: str) -> None:
        super().__init__(name)
        self._op_type = op_type

    def pattern(self, op, x, bias):  # type: ignore[no-untyped-def]
        act = op.Gelu if self._op_type == "Gelu" else op.FastGelu
        return act(op.Add(x, bias), _domain="com.microsoft")

    def check(self, context, x, bias, **_) -> pattern.MatchResult:  # type: ignore[no-untyped-def]
        result = pattern.MatchResult()
        if bias.const_value is None or bias.shape is None or bias.shape.rank() != 1:
            return result.fail("bias is not a constant 1-D vector", bias)
        if x.shape is None or x.shape.rank() is None or x.shape[-1] != bias.shape[0]:
            return result.fail("bias length does not match the input's last dimension", bias)
        return result

    def rewrite(self, op, x, bias):  # type: ignore[no-untyped-def]
        if self._op_type == "Gelu":
            return op.BiasGelu(x, bias, _domain="com.microsoft")
        return op.FastGelu(x, bias, _domain="com.microsoft")


class FuseBiasGelu(RewriteRulesPass):
    name = "fuse-bias-gelu"

    def rules(self) -> Sequence[pattern.RewriteRule]:
        return [
            *BiasGeluFusion.rule("BiasGelu", "Gelu").commute(),
            *BiasGeluFusion.rule("BiasFastGelu", "FastGelu").commute(),
        ]
