"""Decoder self-attention with a KV cache (onnxruntime target) -> com.microsoft GroupQueryAttention.

Identity (Llama / Qwen2 eager attention, one layer of the decoder-with-past graph of
exporter/export/decoder_with_past.py; P = past length, S = new tokens, T = P + S):
    q, k, v   = projections reshaped/transposed to [B, n_q | n_kv, S, h]
    q, k      = rotary(q), rotary(k)                    (the graph's own, from position_ids)
    present_k = Concat(past_key, k, axis=-2)            present_v = Concat(past_value, v, axis=-2)
    out       = reshape(softmax(scale · q·repeat_kv(present_k)ᵀ + mask) · repeat_kv(present_v), [B, S, n_q·h])
which is, with q and k rotated by com.microsoft.RotaryEmbedding on the projection outputs themselves
([B, S, n·h], so the Reshape/Transpose pairs leave the graph) and v the projection output,
    query = RotaryEmbedding(q_lin, ids, cos_cache, sin_cache, num_heads = n_q)     (key: k_lin, n_kv)
    out, present_k, present_v = GroupQueryAttention(query, key, v, past_key, past_value,
        seqlens_k = T - 1 (every row), total_sequence_length = T, attention_bias = mask,
        query_seqlens = S (every row), num_heads = n_q, kv_num_heads = n_kv, scale, do_rotary = 0)
so `present.{i}.key|value` keep their names and are written by the kernel (ONNX Runtime 1.32 schema).

Rotary, exactly: the graph computes one cos/sin row per token from the position_ids input (any rope
scaling folded in); the rule checks they are cos/sin(concat(f, f)) and that rotate_half splits the head in
halves, then hands RotaryEmbedding those very rows: first halves flattened to a [B·S, h/2] cache, and
position ids 0..B·S-1 laid out as [B, S], so token (b, s) reads row b·S + s, its own. Any positions stay
exact (left padding in batched generation included); GroupQueryAttention's own rotary (do_rotary=1)
would derive them from seqlens_k instead. The cache and ids are the same values in every layer, so
common-subexpression elimination computes them once.

Why seqlens_k is the physical T - 1 for every row rather than each row's real length: the kernel takes row b's past as
its first seqlens_k[b] + 1 - S slots (it assumes right padding); with the physical length it reads
the whole cache, the new keys land at P..T-1 where Concat put them, and padding is masked by the
graph's own additive mask passed as attention_bias.
Why query_seqlens: without it the kernel refuses a step with past, batch > 1 and S > 1 ("batch_size
must be 1 when sequence_length > 1 and past context is given"); with S for every row the chunk has no
padding and the result is that of the plain call.

Causality: the kernel (causal=1, its default) keeps key j for query row i iff j <= P + i, which is
HF's causal rule for the same physical layout; the mask adds the same restriction plus padding, so
every real (non-padding) query row gets HF's result. Query rows that are entirely padding (left
padding during prefill) attend to nothing: HF's softmax then averages all T keys while the kernel
averages keys 0..P+i. Those rows, and the cache entries later layers compute from them, differ;
every later query masks them out, so the logits of real tokens are unchanged. (causal=0 would make
those rows agree too — measured equal everywhere — but the schema requires causal=1 with
query_seqlens.)

Per-layer heads: h from the layer's Reshape target, n_q / n_kv from the q / k projection widths, and
the past inputs' static shapes must agree, so a layer pruned to its own KV width fuses with its own
counts. Not matched (the report says why): non-constant scale, head counts that disagree, a mask
that is not [B, 1, S, T], a Concat not on the sequence axis, a rotary that is not rotate_half over the
whole head (partial or interleaved rotary). The attention must be causal (Llama, Mistral, Qwen2 are):
the kernel applies causality itself.
"""

from __future__ import annotations

from collections.abc import Sequence

import onnx_ir as ir
from onnxscript.rewriter import pattern
from onnxscript.rewriter._basics import MatchResult

from graph_passes._rules import RewriteRulesPass, attention_bias_problem, constant_array, scalar_value
from graph_passes.fuse_gqa import layer_heads, repeat_kv_pattern, rotary_problem, rotated_qkv_pattern

_BNSH = [0, 2, 1, 3]


class CachedGqaFusion(pattern.RewriteRuleClassBase):
    def __init__(self, name: str, repeat: bool) -> None:
        # remove_nodes=False: Shape nodes outside the block read the presents and the transposed
        # Q/K (repeat_kv's Expand target, rotate_half's split point); matched nodes that end up
        # unused are removed by the dead-node sweep right after.
        super().__init__(name, remove_nodes=False)
        self._repeat = repeat

    def pattern(
        self,
        op,
        q_lin,
        k_lin,
        v_lin,
        shape_q,
        shape_k,
        shape_v,
        shape_o,
        cos,
        sin,
        cos_axes,
        sin_axes,
        past_k,
        past_v,
        scale,
        mask,
    ):  # type: ignore[no-untyped-def]
        shapes = (shape_q, shape_k, shape_v)
        q, k, v = rotated_qkv_pattern(op, q_lin, k_lin, v_lin, shapes, cos, sin, cos_axes, sin_axes)
        present_k = op.Concat(past_k, k, _allow_other_attributes=True, _outputs=["present_k"])
        present_v = op.Concat(past_v, v, _allow_other_attributes=True, _outputs=["present_v"])
        keys = repeat_kv_pattern(op, present_k, self._repeat, "k_rep")
        values = repeat_kv_pattern(op, present_v, self._repeat, "v_rep")
        scores = op.Mul(op.MatMul(q, op.Transpose(keys, perm=[0, 1, 3, 2])), scale)
        probs = op.Softmax(op.Add(scores, mask), _outputs=["probs"])
        context = op.Transpose(op.MatMul(probs, values), perm=_BNSH)
        return op.Reshape(context, shape_o, _allow_other_attributes=True), present_k, present_v

    def check(self, context, q_lin, k_lin, v_lin, past_k, past_v, scale, mask, **vs) -> MatchResult:  # type: ignore[override]
        result = MatchResult()
        if vs["probs"].producer().attributes.get_int("axis", -1) not in (-1, 3):
            return result.fail("Softmax is not over the key axis")
        for present in (vs["present_k"], vs["present_v"]):
            if present.producer().attributes.get_int("axis", 0) not in (-2, 2):
                return result.fail("past and new keys/values are not concatenated on the sequence axis")
        if scalar_value(scale) is None:
            return result.fail("attention scale is not a constant scalar", scale)
        heads = layer_heads(q_lin, k_lin, v_lin, (vs["shape_q"], vs["shape_k"], vs["shape_v"]))
        if isinstance(heads, str):
            return result.fail(heads)
        _, n_kv, head = heads
        for axes in (constant_array(vs["cos_axes"]), constant_array(vs["sin_axes"])):
            if axes is None or axes.reshape(-1).tolist() != [1]:
                return result.fail("rotary tables are not unsqueezed at the head axis")
        problem = rotary_problem(vs["cos"], vs["sin"], head, vs)
        if problem:
            return result.fail(problem)
        for past in (past_k, past_v):
            dims = list(past.shape) if past.shape is not None else None
            if dims is None or len(dims) != 4 or dims[1] != n_kv or dims[3] != head:
                return result.fail(
                    f"past {past.name} has shape {dims}, expected [batch, {n_kv}, past, {head}] "
                    f"from the projections",
                    past,
                )
        problem = attention_bias_problem(mask)
        if problem:
            return result.fail(problem, mask)
        if mask.shape[2] == 1 and (q_lin.shape is None or q_lin.shape[1] != 1):
            return result.fail(
                "additive mask broadcasts over query rows (the kernel wants [B, 1, S, T])", mask
            )
        return result

    def rewrite(self, op, q_lin, k_lin, v_lin, shape_q, past_k, past_v, scale, mask, cos, sin, **_):  # type: ignore[no-untyped-def]
        n_q, n_kv, head = layer_heads(q_lin, k_lin, v_lin, (shape_q,))  # type: ignore[misc]
        batch, seq, total = sequence_lengths(op, q_lin, past_k)
        caches, positions = per_token_rotary(op, cos, sin, head, batch, seq)
        query, key = (
            op.RotaryEmbedding(x, positions, *caches, num_heads=n, interleaved=0, _domain="com.microsoft")
            for x, n in ((q_lin, n_q), (k_lin, n_kv))
        )
        seqlens_k = op.Cast(
            op.Expand(op.Sub(total, op.Constant(value_ints=[1])), batch), to=ir.DataType.INT32
        )
        query_seqlens = op.Cast(op.Expand(seq, batch), to=ir.DataType.INT32)
        return op.GroupQueryAttention(
            query,
            key,
            v_lin,
            past_k,
            past_v,
            seqlens_k,
            op.Cast(op.Squeeze(total), to=ir.DataType.INT32),
            None,
            None,
            None,
            mask,
            None,
            None,
            None,
            None,
            None,
            query_seqlens,
            num_heads=n_q,
            kv_num_heads=n_kv,
            scale=scalar_value(scale),
            do_rotary=0,
            _domain="com.microsoft",
            _outputs=3,
        )


def per_token_rotary(op, cos: ir.Value, sin: ir.Value, head: int, batch: ir.Value, seq: ir.Value):  # type: ignore[no-untyped-def]
    """((cos_cache, sin_cache), position_ids) for com.microsoft.RotaryEmbedding that give every token the
    graph's own row: the tables' first halves [B or 1, S, h/2] flattened to [rows, h/2], and position ids
    0..rows-1 laid out as [B or 1, S] and broadcast to [B, S]."""
    half = head // 2
    zero, stop, last = (op.Constant(value_ints=[n]) for n in (0, half, -1))
    caches = tuple(
        op.Reshape(op.Slice(t, zero, stop, last), op.Constant(value_ints=[-1, half])) for t in (cos, sin)
    )
    rows = op.Squeeze(op.Shape(caches[0], start=0, end=1), op.Constant(value_ints=[0]))
    ids = op.Range(op.Constant(value_int=0), rows, op.Constant(value_int=1))
    laid_out = op.Reshape(ids, op.Concat(op.Constant(value_ints=[-1]), seq, axis=0))
    return caches, op.Expand(laid_out, op.Concat(batch, seq, axis=0))


def sequence_lengths(op, q_lin: ir.Value, past_k: ir.Value):  # type: ignore[no-untyped-def]
    """(batch, new tokens, total tokens) as 1-element int64 tensors.

    From the graph's `input_ids` [B, S] and `attention_mask` [B, T] inputs when it has them (the
    decoder-with-past contract; any other T would already fail the graph's mask Add): the same values
    in every layer, so common-subexpression elimination keeps one copy for all layers (eight
    per-layer copies cost 5 % of a decode step, measured). Else from this layer's q and past."""
    graph = q_lin.graph
    inputs = {v.name: v for v in graph.inputs if v.shape is not None and v.shape.rank() == 2} if graph else {}
    if "input_ids" in inputs and "attention_mask" in inputs:
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        return op.Shape(ids, start=0, end=1), op.Shape(ids, start=1, end=2), op.Shape(mask, start=1, end=2)
    seq = op.Shape(q_lin, start=1, end=2)
    return op.Shape(q_lin, start=0, end=1), seq, op.Add(op.Shape(past_k, start=2, end=3), seq)


class FuseGroupQueryAttentionKvCache(RewriteRulesPass):
    name = "fuse-gqa-kv-cache"

    def rules(self) -> Sequence[pattern.RewriteRule]:
        return [
            CachedGqaFusion.rule("CachedGQA[repeat_kv]", repeat=True),
            CachedGqaFusion.rule("CachedGQA[same_heads]", repeat=False),
        ]
