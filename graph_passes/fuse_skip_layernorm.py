"""Skip+LayerNorm fusion (onnxruntime target): LayerNorm(a + b) -> SkipLayerNormalization(a, b);
SimplifiedLayerNormalization(a + b) -> SkipSimplifiedLayerNormalization(a, b).

The residual Add feeding a norm is one more pass over the hidden states; ONNX Runtime's Skip* kernels
do it in the norm's loop and also return the sum (their 4th output), which replaces the Add for the
next residual. Rules are onnxscript's (ort_fusions.skip_normalization) without the bias variants:
bias folding is its own pass (fuse_matmul_bias). Inputs must be 3-D [B, S, D] with 1-D gamma/beta.
"""

from __future__ import annotations

from collections.abc import Sequence

from onnxscript.rewriter import pattern
from onnxscript.rewriter.ort_fusions.skip_normalization import SkipLayerNormFusion, SkipRmsNormFusion

from graph_passes._rules import RewriteRulesPass


class FuseSkipLayerNorm(RewriteRulesPass):
    name = "fuse-skip-layernorm"

    def rules(self) -> Sequence[pattern.RewriteRule]:
        return [SkipLayerNormFusion.rule("SkipLayerNorm"), SkipRmsNormFusion.rule("SkipSimplifiedLayerNorm")]
