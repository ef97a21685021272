"""Which fusions should fire, per layer, for a model family and target — and whether they did.

Before the fusion stage we count the *sites* of each fusion in every layer (a Softmax is one attention,
an Erf or a tanh-GELU's Tanh one GELU, a LayerNormalization or decomposed mean-ReduceMean one LayerNorm,
a ReduceMean of x² one RMSNorm). After it we count the fused ops per layer. A layer with fewer fused ops than sites is
listed with the reason the rule gave (from the passes' match traces). Fusions the target cannot express
(e.g. GELU at opset 17 for TensorRT) are listed as not applicable, with why, and never fail strict mode.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Callable, Sequence

import onnx_ir as ir

from export_errors import InputError
from graph_passes._rules import layer_of, scalar_value
from graph_passes.base import PassReport

ENCODER_FAMILIES = ("bert", "roberta", "xlm-roberta", "distilbert", "electra", "mpnet")
DECODER_FAMILIES = ("llama", "qwen2", "mistral")


@dataclasses.dataclass(frozen=True)
class Expectation:
    fusion: str
    sites: Callable[[ir.Node], bool]  # is this node one site of the fusion (before fusing)?
    produced: tuple[str, ...]  # op types that count as the fused result
    passes: tuple[str, ...]  # passes whose match traces explain a miss
    not_applicable: str | None = None  # why this target cannot have it


def _is_layernorm_site(node: ir.Node) -> bool:
    if node.op_type == "LayerNormalization":
        return True
    return node.op_type == "ReduceMean" and any(use.op_type == "Sub" for use, _ in node.outputs[0].uses())


def _is_rmsnorm_site(node: ir.Node) -> bool:
    """ReduceMean of x² where x is not a mean-centred value (that would be a LayerNorm's variance)."""
    if node.op_type != "ReduceMean" or node.inputs[0] is None:
        return False
    square = node.inputs[0].producer()
    if square is None:
        return False
    if square.op_type == "Pow":
        squared = scalar_value(square.inputs[1]) == 2.0
    else:
        squared = square.op_type == "Mul" and square.inputs[0] is square.inputs[1]
    base = square.inputs[0].producer() if square.inputs[0] is not None else None
    return squared and not (base is not None and base.op_type == "Sub")


def _is_gelu_site(node: ir.Node) -> bool:
    """An Erf, or a Tanh feeding `1 + tanh(...)` (tanh-GELU); a plain Tanh activation (BERT's pooler,
    RoBERTa's classification head) is not a GELU."""
    if node.op_type == "Erf":
        return True
    return node.op_type == "Tanh" and any(use.op_type == "Add" for use, _ in node.outputs[0].uses())


def _is_attention_site(node: ir.Node) -> bool:
    return node.op_type == "Softmax"


_OPSET17 = (
    "opset 17 (the TensorRT target's opset) has no {op} op; the standard-op form is kept for TensorRT to fuse"
)


def has_kv_cache(model: ir.Model) -> bool:
    """True for a decoder-with-past graph (past_key_values.* inputs)."""
    return any(
        (v.name or "").startswith(("past_key_values", "past_key", "past.")) for v in model.graph.inputs
    )


def expectations(kind: str, target: str, kv_cache: bool = False) -> list[Expectation]:
    """The fusions expected for an 'encoder' or 'decoder' on `target`.

    A decoder's attention is fused by `fuse-gqa` without a KV cache and by `fuse-gqa-kv-cache` with
    one (`kv_cache`): only that pass's match traces explain a miss."""
    trt = target == "tensorrt"
    if kind == "encoder":
        return [
            Expectation(
                "layernorm",
                _is_layernorm_site,
                ("LayerNormalization", "SkipLayerNormalization", "EmbedLayerNormalization"),
                ("fuse-layernorm", "fuse-skip-layernorm", "fuse-embed-layernorm"),
            ),
            Expectation(
                "gelu",
                _is_gelu_site,
                ("Gelu", "BiasGelu", "FastGelu"),
                ("fuse-gelu", "fuse-bias-gelu"),
                _OPSET17.format(op="Gelu (opset 20)") if trt else None,
            ),
            Expectation(
                "attention",
                _is_attention_site,
                ("Attention", "MultiHeadAttention"),
                ("fuse-attention",),
                _OPSET17.format(op="Attention (opset 23)") if trt else None,
            ),
        ]
    return [
        Expectation(
            "rmsnorm",
            _is_rmsnorm_site,
            ("SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization"),
            ("fuse-rmsnorm", "fuse-skip-layernorm"),
            _OPSET17.format(op="RMSNormalization (opset 23)") if trt else None,
        ),
        Expectation(
            "attention",
            _is_attention_site,
            ("GroupQueryAttention",),
            ("fuse-gqa-kv-cache",) if kv_cache else ("fuse-gqa",),
            _OPSET17.format(op="Attention (opset 23)") if trt else None,
        ),
    ]


def family_kind(family: str | None, model: ir.Model) -> str:
    """'encoder' or 'decoder' from the HF model_type, or from the graph when no family is given."""
    if family is not None:
        if family in ENCODER_FAMILIES:
            return "encoder"
        if family in DECODER_FAMILIES:
            return "decoder"
        supported = ", ".join(ENCODER_FAMILIES + DECODER_FAMILIES)
        raise InputError("--family", f"unknown model family {family!r}; supported: {supported}")
    ops = Counter(n.op_type for n in ir.traversal.RecursiveGraphIterator(model.graph))
    return "decoder" if ops["Cos"] and ops["Sin"] else "encoder"


def count_sites(model: ir.Model, exps: Sequence[Expectation]) -> dict[str, Counter[str]]:
    """fusion -> layer -> number of sites, on the graph before fusion."""
    out: dict[str, Counter[str]] = {e.fusion: Counter() for e in exps}
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        for exp in exps:
            if exp.sites(node):
                out[exp.fusion][layer_of(node)] += 1
    return out


def compare(
    model: ir.Model, exps: Sequence[Expectation], sites: dict[str, Counter[str]], passes: Sequence[PassReport]
) -> list[dict]:
    """One row per (fusion, layer): expected, applied, status and the reason of a miss."""
    rows = []
    for exp in exps:
        produced: Counter[str] = Counter(
            layer_of(n) for n in ir.traversal.RecursiveGraphIterator(model.graph) if n.op_type in exp.produced
        )
        for layer in sorted(sites[exp.fusion], key=_layer_key):
            expected = sites[exp.fusion][layer]
            row = {"fusion": exp.fusion, "layer": layer, "expected": expected}
            applied = min(produced[layer], expected)
            if exp.not_applicable:
                rows.append(
                    row | {"applied": applied, "status": "not_applicable", "reason": exp.not_applicable}
                )
                continue
            row |= {"applied": applied, "status": "applied" if applied == expected else "not_applied"}
            if applied < expected:
                row["reason"] = _reason(passes, exp.passes, layer)
            rows.append(row)
    return rows


def _layer_key(layer: str) -> tuple[int, int]:
    return (0, int(layer)) if layer.isdigit() else (1, 0)


def _reason(passes: Sequence[PassReport], names: Sequence[str], layer: str) -> str:
    """The most specific match-failure reason the relevant passes recorded for this layer."""
    candidates = [d for p in passes if p.name in names for d in p.details if d.get("layer") == layer]
    ranked = sorted(candidates, key=lambda d: d.get("status") != "CONDITION_FAILED")
    if not ranked:
        return "no rule matched any part of this layer's pattern"
    best = ranked[0]
    return f"{best['rule']} at {best['node'] or '?'}: {best['reason']}"
