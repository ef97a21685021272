"""RMSNorm fusion for the onnxruntime target: -> SimplifiedLayerNormalization (ONNX Runtime's RMSNorm op).

Identity (Llama/Qwen2 `RMSNorm`): y = gamma · x / sqrt(mean(x²) + eps). Our TorchScript exports write it
as Pow 2 / ReduceMean / Add eps / Sqrt / Div(1, ·) / Mul x / Mul gamma; Reciprocal for Div(1, ·) and
x / rms are matched too. onnxscript's own rule expects Reciprocal and ReduceMean-18 and does not fire on
these graphs, hence this module.

tensorrt target: not run. Opset 17 has no RMS normalization op; ONNX's RMSNormalization is opset 23
(ONNX Runtime 1.32 implements it, but the TensorRT 10 ONNX parser's support could not be checked here
without a GPU), so the TensorRT pipeline keeps the standard-op chain at opset 17.
"""

from __future__ import annotations

from collections.abc import Sequence

from onnxscript.rewriter import pattern

from graph_passes._rules import RewriteRulesPass, scalar_value
from graph_passes.fuse_layernorm import reduces_last_axis


class RmsNormFusion(pattern.RewriteRuleClassBase):
    def __init__(self, name: str, square: str, normalize: str) -> None:
        super().__init__(name)
        self._square, self._normalize = square, normalize

    def pattern(self, op, x, gamma, eps):  # type: ignore[no-untyped-def]
        x2 = op.Pow(x, 2.0) if self._square == "pow" else op.Mul(x, x)
        mean_square = op.ReduceMean(x2, _allow_other_inputs=True, _outputs=["ms"])
        rms = op.Sqrt(op.Add(mean_square, eps))
        if self._normalize == "div1":
            normalized = op.Mul(x, op.Div(1.0, rms))
        elif self._normalize == "reciprocal":
            normalized = op.Mul(x, op.Reciprocal(rms))
        else:
            normalized = op.Div(x, rms)
        return op.Mul(gamma, normalized)

    def check(self, context, x, gamma, eps, ms, **_) -> pattern.MatchResult:  # type: ignore[no-untyped-def]
        result = pattern.MatchResult()
        if not reduces_last_axis(ms.producer()):
            return result.fail("ReduceMean is not over the last axis only with keepdims=1")
        if scalar_value(eps) is None:
            return result.fail("epsilon is not a constant scalar", eps)
        if gamma.shape is None or gamma.shape.rank() != 1:
            return result.fail("gamma is not known to be 1-D", gamma)
        return result

    def rewrite(self, op, x, gamma, eps, **_):  # type: ignore[no-untyped-def]
        return op.SimplifiedLayerNormalization(x, gamma, axis=-1, epsilon=scalar_value(eps), stash_type=1)


def rmsnorm_rules() -> list[pattern.RewriteRule]:
    rules = []
    for square in ("pow", "mul"):
        for normalize in ("div1", "reciprocal", "div"):
            rules += RmsNormFusion.rule(f"RMSNorm[{square},{normalize}]", square, normalize).commute()
    return rules


class FuseRmsNorm(RewriteRulesPass):
    name = "fuse-rmsnorm"

    def rules(self) -> Sequence[pattern.RewriteRule]:
        return rmsnorm_rules()
