"""FLOPs per token of a transformer layer's sublayers, from their shapes: what restructuring saves.

Counted: the matrix products, one multiply and one add per weight and token (a Linear `in -> out` costs
2·in·out per token), and attention's two products over the context (scores q·kᵀ and the weighted sum of
values: 2·d per query head and context token each). Not counted (O(hidden) or O(heads·context) per
token, a few percent at most): biases, norms, activations, softmax, rotary, residual adds.

    attention(h, n_q, n_kv, d) = 2·h·d·(2·n_q + 2·n_kv)  +  4·n_q·d · T      (q, o: n_q·d wide; k, v: n_kv·d)
    mlp(h, f)                  = 2·h·f·3 (gated: gate, up, down)  or  2·h·f·2 (BERT: in, out)

T is the number of context tokens attended to (the prompt plus the tokens generated so far), so a
count is two numbers: {"fixed": FLOPs independent of T, "per_context_token": the factor of T}. At a
context of T tokens a token costs fixed + per_context_token·T. A removed sublayer saves all of its
count; a removed KV group saves its share of both terms.
"""

from __future__ import annotations

FORMULA = (
    "FLOPs per token = fixed + per_context_token * T (T: context tokens attended to); attention = "
    "2*h*d*(2*n_q + 2*n_kv) + 4*n_q*d*T, gated MLP = 6*h*f, BERT FFN = 4*h*f; biases, norms, activations "
    "and softmax not counted (exporter/restructure/flops.py)"
)


def flops(fixed: int = 0, per_context_token: int = 0) -> dict[str, int]:
    return {"fixed": int(fixed), "per_context_token": int(per_context_token)}


def attention_flops(hidden: int, n_q: int, n_kv: int, head_dim: int) -> dict[str, int]:
    """q, k, v, o projections plus scores and weighted values over the context (zero heads: zero)."""
    return flops(2 * hidden * head_dim * (2 * n_q + 2 * n_kv), 4 * n_q * head_dim)


def mlp_flops(hidden: int, ffn: int, gated: bool) -> dict[str, int]:
    """gate/up/down (gated, Llama-style) or in/out (BERT-style) projections."""
    return flops(2 * hidden * ffn * (3 if gated else 2))


def add(*counts: dict[str, int]) -> dict[str, int]:
    return flops(sum(c["fixed"] for c in counts), sum(c["per_context_token"] for c in counts))


def at_context(count: dict[str, int], context: int) -> int:
    """FLOPs per token when `context` tokens are attended to."""
    return count["fixed"] + count["per_context_token"] * context
