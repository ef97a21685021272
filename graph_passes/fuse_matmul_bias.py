"""MatMul+bias fusion (onnxruntime target): the bias Add after a MatMul goes into the next fused kernel.

Identity: Skip*Norm(MatMul(a, W) + b, skip, ...) = Skip*Norm(MatMul(a, W), skip, ..., bias=b), because
both Skip kernels compute norm(input + skip + bias). This removes the separate Add after the attention
output and FFN output projections. (Bias folding into the activation is fuse_bias_gelu; into attention,
fuse_attention.) Standalone MatMul+Add is left to ONNX Runtime's own MatMul/Add kernels: it has no
faster 3-D fused op, and TensorRT fuses bias epilogues itself, so the tensorrt target does not run this.
"""

from __future__ import annotations

from collections.abc import Sequence

from onnxscript.rewriter import pattern

from graph_passes._rules import RewriteRulesPass


class SkipNormBiasFusion(pattern.RewriteRuleClassBase):
    def __init__(self, name: str, simplified: bool, matmul_is_skip: bool) -> None:
        super().__init__(name)
        self._simplified, self._matmul_is_skip = simplified, matmul_is_skip

    def _norm(self, op, first, second, gamma, beta, bias=None, **attrs):  # type: ignore[no-untyped-def]
        extra = [] if bias is None else [bias]
        if self._simplified:
            inputs = [first, second, gamma, *extra]
            return op.SkipSimplifiedLayerNormalization(*inputs, _domain="com.microsoft", **attrs)
        return op.SkipLayerNormalization(first, second, gamma, beta, *extra, _domain="com.microsoft", **attrs)

    def pattern(self, op, a, w, bias, other, gamma, beta):  # type: ignore[no-untyped-def]
        biased = op.Add(op.MatMul(a, w), bias)
        first, second = (other, biased) if self._matmul_is_skip else (biased, other)
        return self._norm(
            op,
            first,
            second,
            gamma,
            beta,
            _outputs=["out", "mean", "inv_std", "sum"],
            _allow_other_attributes=True,
        )

    def check(self, context, bias, out, **_) -> pattern.MatchResult:  # type: ignore[no-untyped-def]
        result = pattern.MatchResult()
        if bias.const_value is None or bias.shape is None or bias.shape.rank() != 1:
            return result.fail("bias is not a constant 1-D vector", bias)
        if len(out.producer().inputs) > (3 if self._simplified else 4):
            return result.fail("the norm already has a bias input")
        return result

    def rewrite(self, op, a, w, bias, other, gamma, out, beta=None, **_):  # type: ignore[no-untyped-def]
        matmul = op.MatMul(a, w)
        first, second = (other, matmul) if self._matmul_is_skip else (matmul, other)
        eps = out.producer().attributes.get_float("epsilon", 1e-5)
        return self._norm(op, first, second, gamma, beta, bias, epsilon=eps, _outputs=4)


class FuseMatMulBias(RewriteRulesPass):
    name = "fuse-matmul-bias"

    def rules(self) -> Sequence[pattern.RewriteRule]:
        rules = []
        for kind in ("layernorm", "simplified"):
            for where in ("input", "skip"):
                name = f"SkipNormBias[{kind},{where}]"
                rules += SkipNormBiasFusion.rule(name, kind == "simplified", where == "skip").commute()
        return rules
