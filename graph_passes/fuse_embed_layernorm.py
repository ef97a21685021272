"""Embedding + LayerNorm fusion (onnxruntime target): -> com.microsoft EmbedLayerNormalization.

Identity (BERT embeddings):
    e = LayerNorm(Gather(W_word, ids) + Gather(W_type, token_types) + Gather(W_pos, positions))
which is `EmbedLayerNormalization(int32(ids), int32(token_types), W_word, W_pos, W_type, gamma, beta,
position_ids=int32(positions))`: three lookups, two adds and the norm in one kernel, one pass over the
[B, S, H] output instead of four. The positions are passed through as they are computed (HF slices its
position buffer), so nothing is assumed about them; ids only need to fit int32, which any vocabulary does.
The kernel's mask_index output is not used: attention takes the 2-D mask itself (fuse_attention).
Models without token types (no type embedding Add) keep the unfused form.
"""

from __future__ import annotations

from collections.abc import Sequence

import onnx_ir as ir
from onnxscript.rewriter import pattern

from graph_passes._rules import RewriteRulesPass


class EmbedLayerNormFusion(pattern.RewriteRuleClassBase):
    def pattern(self, op, word_w, ids, type_w, types, pos_w, positions, gamma, beta):  # type: ignore[no-untyped-def]
        lookups = [
            op.Gather(table, index, _allow_other_attributes=True, _outputs=[f"{name}_rows"])
            for table, index, name in (
                (word_w, ids, "word"),
                (type_w, types, "type"),
                (pos_w, positions, "pos"),
            )
        ]
        summed = op.Add(op.Add(lookups[0], lookups[1]), lookups[2])
        return op.LayerNormalization(summed, gamma, beta, _allow_other_attributes=True, _outputs=["normed"])

    def check(  # type: ignore[no-untyped-def]
        self, context, word_w, type_w, pos_w, gamma, beta, ids, types, positions, normed, **_
    ) -> pattern.MatchResult:
        result = pattern.MatchResult()
        rows = (_.get("word_rows"), _.get("type_rows"), _.get("pos_rows"))
        if any(r.producer().attributes.get_int("axis", 0) != 0 for r in rows):
            return result.fail("a lookup gathers along an axis other than 0")
        if normed.producer().attributes.get_int("axis", -1) not in (-1, 2):
            return result.fail("LayerNorm is not over the hidden axis", normed)
        tables = (word_w, type_w, pos_w)
        if any(t.const_value is None or t.shape is None or t.shape.rank() != 2 for t in tables):
            return result.fail("an embedding table is not a constant 2-D weight")
        if len({t.shape[1] for t in tables}) != 1:
            return result.fail("embedding tables differ in width")
        if gamma.const_value is None or beta.const_value is None:
            return result.fail("LayerNorm scale / bias are not constants")
        for value in (ids, types, positions):
            if value.dtype not in (ir.DataType.INT64, ir.DataType.INT32):
                return result.fail("indices are not int64 / int32", value)
            if value.shape is None or value.shape.rank() != 2:
                return result.fail("indices are not 2-D [B or 1, S]", value)
        if ids.shape != types.shape:  # the kernel reads segment_ids with input_ids' shape
            return result.fail("token type ids are not shaped like input_ids", types)
        return result

    def rewrite(self, op, word_w, ids, type_w, types, pos_w, positions, gamma, beta, normed, **_):  # type: ignore[no-untyped-def]
        epsilon = normed.producer().attributes.get_float("epsilon", 1e-5)
        int32 = [op.Cast(v, to=ir.DataType.INT32) for v in (ids, types, positions)]
        out, _mask_index = op.EmbedLayerNormalization(
            int32[0],
            int32[1],
            word_w,
            pos_w,
            type_w,
            gamma,
            beta,
            None,
            int32[2],
            epsilon=epsilon,
            _domain="com.microsoft",
            _outputs=2,
        )
        return out


class FuseEmbedLayerNorm(RewriteRulesPass):
    name = "fuse-embed-layernorm"

    def rules(self) -> Sequence[pattern.RewriteRule]:
        return [*EmbedLayerNormFusion.rule("EmbedLayerNorm").commute()]
