"""INT4 mixed precision, cost-aware: which pieces go to 8 bits, judged by cosine gained per byte read per step.

Why: at batch 1 a decode step reads every weight once, so its time follows the bytes of the file's
projections, and an 8-bit piece reads about twice the bytes of its 4-bit form. The INT8 search
(exporter/quantize/sensitivity.py) widens the worst layers first whatever their size; here the unit of choice is
what the CPU file reads as one node, and the order is its error per extra byte:
- units: the projections that pack into one MatMulNBits (q/k/v of a layer, gate/up of a layer: the CPU file
  keeps a packed group at one bit width, int4.widen_mixed_groups) are one unit; every other projection, and the
  embedding, alone;
- cost: the unit's extra bytes per decode step at 8 bits over 4 bits (codes and fp32 block scales,
  `step_bytes`); the embedding is read one row per token, so its cost is one row's;
- error: the search cosine lost with only that unit at 4 bits (every other at 8), from the sweep;
- order: error / cost, highest first; widened one unit at a time, the real combined file measured after each,
  until the target is reached or the budget of pieces is spent (as the INT8 search does).
Tested in tests/test_int4_search.py (the order, the grouping, the stop rule) with a stubbed evaluation.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence

import onnx

from exporter import progress
from exporter.quantize.sensitivity import SensitivityResult

logger = logging.getLogger(__name__)

SCALE_BYTES = 4  # MatMulNBits' scales are the model's float type (fp32 here), one per block and column


def step_bytes(k: int, n: int, bits: int, block: int) -> int:
    """Bytes of one MatMulNBits weight [K, N] read per decode step: codes of K padded to the block, one scale
    per block and column."""
    blocks = -(-k // block)
    return n * (blocks * block * bits // 8 + blocks * SCALE_BYTES)


def units(model: onnx.ModelProto, candidates: Sequence[str], roles: Sequence[str]) -> list[tuple[str, ...]]:
    """The candidates grouped as the CPU file reads them: MatMuls of `roles` sharing an input (a packed
    group) are one unit, in graph order; every other candidate is a unit alone."""
    wanted = set(candidates)
    groups: dict[str, list[str]] = defaultdict(list)
    for node in model.graph.node:
        if node.op_type == "MatMul" and node.name in wanted and any(r in node.name for r in roles):
            groups[node.input[0]].append(node.name)
    packed = {name: tuple(names) for names in groups.values() for name in names}
    out: list[tuple[str, ...]] = []
    for name in candidates:
        unit = packed.get(name, (name,))
        if unit not in out:
            out.append(unit)
    return out


def search_by_cost(
    unit_list: Sequence[tuple[str, ...]],
    cost: Mapping[str, float],
    evaluate: Callable[[frozenset[str]], float],
    target: float,
    max_pieces: int,
    sweep: Callable[[Sequence[tuple[str, ...]]], dict[tuple[str, ...], float]],
) -> SensitivityResult:
    """Greedy widening by error per extra byte (module docstring). `cost`: extra bytes per piece;
    `evaluate(wide pieces)` -> search cosine; `sweep(units)` -> each unit's cosine alone at 4 bits."""
    all_quantized = evaluate(frozenset())
    trace: list[dict[str, object]] = [{"excluded": 0, "cosine": all_quantized}]
    if all_quantized >= target:
        return SensitivityResult([], all_quantized, all_quantized, {}, trace, met=True)
    alone = sweep(unit_list)
    error = {u: max(1.0 - alone[u], 0.0) for u in unit_list}
    unit_cost = {u: max(sum(cost[n] for n in u), 1.0) for u in unit_list}
    order = sorted(unit_list, key=lambda u: -error[u] / unit_cost[u])
    excluded: list[str] = []
    cosine = all_quantized
    for unit in progress.bar(order, desc="int4 mixed precision: by cost", unit="unit"):
        if len(excluded) + len(unit) > max_pieces:
            continue
        excluded.extend(unit)
        cosine = evaluate(frozenset(excluded))
        trace.append(
            {"excluded": len(excluded), "node": list(unit), "cosine": cosine, "bytes": unit_cost[unit]}
        )
        logger.info("int4 search: %d pieces at 8 bits -> cosine %.5f", len(excluded), cosine)
        if cosine >= target:
            break
    layer_error = {n: error[u] for u in unit_list for n in u}
    return SensitivityResult(excluded, cosine, all_quantized, layer_error, trace, met=cosine >= target)
