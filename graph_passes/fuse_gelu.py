"""GELU fusion for the onnxruntime target: -> com.microsoft Gelu (erf form) / FastGelu (tanh form).

Identities: GELU(x) = 0.5·x·(1 + erf(x/√2)); its tanh approximation is
0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³))). Exporters place the 0.5 in any of three spots (on x, on the
bracket, on the product) and write x/√2 as a Div or as a Mul by 1/√2: all of those are matched, and the
Mul/Add nodes of the erf form are matched in either operand order; the tanh form in the order
PyTorch's exporter writes it (x + 0.044715·x³ with the constant on the right).

tensorrt target: not run. ONNX's Gelu is opset 20 and our exports are opset 17, so the standard erf
form stays; TensorRT recognises it itself.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from onnxscript.rewriter import pattern

from graph_passes._rules import RewriteRulesPass

_SQRT2 = math.sqrt(2.0)
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def _half_times(op, x, bracket, form: str):  # type: ignore[no-untyped-def]
    """0.5 · x · bracket with the 0.5 in position `form`."""
    if form == "on_x":
        return op.Mul(op.Mul(x, 0.5), bracket)
    if form == "on_bracket":
        return op.Mul(x, op.Mul(bracket, 0.5))
    return op.Mul(op.Mul(x, bracket), 0.5)


class ErfGeluFusion(pattern.RewriteRuleClassBase):
    def __init__(self, name: str, form: str, scaled_by: str) -> None:
        super().__init__(name)
        self._form, self._scaled_by = form, scaled_by

    def pattern(self, op, x):  # type: ignore[no-untyped-def]
        scaled = op.Div(x, _SQRT2) if self._scaled_by == "div" else op.Mul(x, 1.0 / _SQRT2)
        return _half_times(op, x, op.Add(op.Erf(scaled), 1.0), self._form)

    def rewrite(self, op, x):  # type: ignore[no-untyped-def]
        return op.Gelu(x, _domain="com.microsoft")


class TanhGeluFusion(pattern.RewriteRuleClassBase):
    def __init__(self, name: str, form: str) -> None:
        super().__init__(name)
        self._form = form

    def pattern(self, op, x):  # type: ignore[no-untyped-def]
        inner = op.Add(x, op.Mul(op.Pow(x, 3.0), 0.044715))
        bracket = op.Add(op.Tanh(op.Mul(inner, _SQRT_2_OVER_PI)), 1.0)
        return _half_times(op, x, bracket, self._form)

    def rewrite(self, op, x):  # type: ignore[no-untyped-def]
        return op.FastGelu(x, _domain="com.microsoft")


def gelu_rules() -> list[pattern.RewriteRule]:
    rules = []
    for form in ("on_x", "on_bracket", "on_product"):
        for scaled_by in ("div", "mul"):
            rules += ErfGeluFusion.rule(f"ErfGelu[{form},{scaled_by}]", form, scaled_by).commute()
        # Not commuted: seven binary ops would make 128 variants per form (seconds per model).
        rules.append(TanhGeluFusion.rule(f"TanhGelu[{form}]", form))
    return rules


class FuseGelu(RewriteRulesPass):
    name = "fuse-gelu"

    def rules(self) -> Sequence[pattern.RewriteRule]:
        return gelu_rules()
