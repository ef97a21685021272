"""The INT4 stage of a KV-cache decoder export: weight-only INT4, one file per backend, each gated.

Order: exported fp32 graph -> (a) our onnxruntime passes (RotaryEmbedding + GroupQueryAttention kept) for the
CPU file, (b) cleanup only (standard ops) for the TensorRT file -> calibration prefills -> rows of every
projection's input -> AWQ-style input scales + clipping (or round-to-nearest) -> mixed precision: the layers
that cost most go to 8-bit blocks until held-out logit cosine vs fp32 reaches the target -> both files ->
the gate. Files:

- `model.int4.cpu.onnx` (ONNX Runtime CPU): com.microsoft.MatMulNBits (bits 4, or 8 for the layers the
  search kept wider), accuracy_level 4, symmetric blocks, embedding through GatherBlockQuantized;
- `model.int4.onnx` (TensorRT): opset 21, DequantizeLinear(int4 weight, block-shaped scales, block_size,
  zero point 0) feeding each MatMul, standard ops only (engines/tensorrt/checks.py knows the INT4 rules).

Both files carry the same plan, so the weights each backend dequantizes are the same numbers.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import tempfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx

from export_errors import InputError, ValidationError
from exporter.export.external_data import save_onnx
from exporter.quantize import decoder_calibration
from exporter.quantize.awq import METHODS, Method
from exporter.quantize.blocks import check_block_size
from exporter.quantize.calibration import CalibrationData, load_stage_calibration
from exporter.quantize.int4 import (
    EMBEDDING,
    MIN_OPSET,
    SWITCH_INPUT,
    Plan,
    Prepared,
    Site,
    collect_rows,
    cpu_model,
    embedding_table,
    find_sites,
    prepare,
    switchable_models,
    tensorrt_model,
    widen_mixed_groups,
    with_opset,
)
from exporter.quantize.int4_search import search_by_cost, step_bytes, units
from exporter.quantize.int8 import Judge, _session
from exporter.quantize.sensitivity import search
from exporter.validate.tolerances import tolerance
from graph_passes.pipeline import optimize

logger = logging.getLogger(__name__)

CPU_FILE = "model.int4.cpu.onnx"
TENSORRT_FILE = "model.int4.onnx"
# Measured (tools/bench_decoder.py --int4-methods, README "INT4"): see the README table for the numbers.
DEFAULT_METHOD: Method = "awq"
# Layer projections' block size. Measured (tools/bench_decoder.py --peers' llama-512, run_int4_stage with the
# cost-aware search, Sapphire Rapids, 2 threads, README "INT4"): decode 442.4 (block 32) -> 488.3 (64) -> 510.8
# tok/s (128) vs the builder's int4 446.8 in the same run, held-out logit cosine 0.9718 -> 0.9707 -> 0.9710 (the
# search widens layers 0-3's attention at 128 instead of 0-1's), file 41.2 -> 39.7 -> 38.2 MiB. At most the
# model's hidden size (`effective_block_size`): a block longer than K is only padding.
DEFAULT_BLOCK_SIZE = 128
# lm_head: 4-bit unless the search widens it (`auto`); --int4-lm-head int4|int8 fixes it. Measured (same harness
# as PACKED_PROJECTIONS, block 32, RTN): 8-bit lm_head decode 371.8 vs 4-bit 411.9 tok/s, file 40.9 vs 33.1 MiB.
LM_HEAD_BITS = 4
# lm_head block size (at least `block_size`): the lm_head is about half the weight bytes read per decode step
# (vocab x hidden), and at block 32 its fp32 scales add 25% to its 4-bit codes (4 bytes per 16); at 128, 6%.
# Measured (tools/bench_decoder.py --peers' llama-512, the gated INT4 file with only the lm_head requantized,
# Sapphire Rapids, 2 threads, README "INT4"): decode 494.9 (block 32) -> 500.8 (64) -> 511.5 tok/s (128), file
# 42.5 -> 41.0 MiB, held-out logit cosine vs fp32 0.9700 -> 0.9683 (both round-to-nearest).
LM_HEAD_BLOCK_SIZE = 128
# The CPU file packs q/k/v and gate/up into one MatMulNBits each (+ Split): measured with tools/bench_decoder.py
# --peers' harness (llama-512, block 32, 2 threads, this session's Xeon): decode 445 -> 450 tok/s packing q/k/v,
# 472 packing gate/up too (genai int4 465 in the same run); prefill unchanged. The mixed-precision search runs
# on the unpacked file (same numbers: packing is exact), the held-out gate on the packed one.
PACKED_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
SEARCH_MARGIN = 0.25  # the search aims this fraction of the way from the target to 1 (as INT8)
LmHead = Literal["auto", "int4", "int8"]
# Mixed-precision order: "cost" widens the pieces with the most error per extra byte read per decode step
# (exporter/quantize/int4_search.py), "worst" the worst first whatever their size (the INT8 stage's search).
Search = Literal["cost", "worst"]
DEFAULT_SEARCH: Search = "cost"


@dataclasses.dataclass
class Int4Config:
    method: Method = DEFAULT_METHOD
    block_size: int = DEFAULT_BLOCK_SIZE
    accuracy_level: int = 4
    lm_head: LmHead = "auto"
    lm_head_block_size: int = LM_HEAD_BLOCK_SIZE  # the lm_head's blocks: max(this, block_size)
    min_cosine: float = tolerance("int4").min_mean_cosine or 0.95
    mixed_precision: bool = True
    max_int8_fraction: float = 1.0  # the search may widen every layer to 8 bits (then the file is W8)
    sensitivity_samples: int = 16
    # The sweep (every layer alone at 4 bits) only ranks layers, and the greedy steps after it are judged on
    # all `sensitivity_samples`: on the llama-512 benchmark model the sweep on 4 samples picked the same
    # layers as on 16, at a quarter of the stage's largest cost (README "INT4", stage time).
    sweep_samples: int = 4
    # Rows of the CPU file's rotary tables (GroupQueryAttention's own rotary reads positions < this):
    # the model's max_position_embeddings, as onnxruntime-genai's builder sizes its cos/sin caches.
    max_positions: int = 4096
    search: Search = DEFAULT_SEARCH

    def validate(self) -> None:
        if self.method not in METHODS:
            raise InputError("--int4-method", f"choose from {METHODS}, got {self.method!r}")
        try:
            check_block_size(self.block_size, 4)
        except ValueError as exc:
            raise InputError("--int4-block-size", str(exc)) from None
        try:
            check_block_size(self.lm_head_block_size, 4)
        except ValueError as exc:
            raise InputError("lm_head_block_size", str(exc)) from None
        if self.lm_head not in ("auto", "int4", "int8"):
            raise InputError("--int4-lm-head", f"choose auto, int4 or int8, got {self.lm_head!r}")
        if self.search not in ("cost", "worst"):
            raise InputError("search", f"choose cost or worst, got {self.search!r}")
        if self.accuracy_level not in (0, 1, 2, 3, 4):
            raise InputError("accuracy_level", f"MatMulNBits takes 0..4, got {self.accuracy_level}")

    def lm_head_bits(self) -> int:
        return {"auto": LM_HEAD_BITS, "int4": 4, "int8": 8}[self.lm_head]

    def lm_head_block(self) -> int:
        """The lm_head's block before clamping to the model (`effective_block_sizes`)."""
        return max(self.lm_head_block_size, self.block_size)


@dataclasses.dataclass
class Int4Result:
    cpu_path: Path
    tensorrt_path: Path
    report: dict[str, Any]


def run_int4_stage(
    exported: Path,
    work: Path,
    calibration: CalibrationData,
    config: Int4Config,
    *,
    family: str,
    optimized: Path | None = None,
) -> Int4Result:
    """Both INT4 files from the exported fp32 decoder, gated on held-out logit cosine vs fp32. `optimized`: the
    export's model.onnx when our onnxruntime pipeline wrote it (2:4 tags at most, no enforced sparsity): the
    CPU file's fp32 graph, instead of optimizing `exported` again (~8 s of the stage on a 45M model)."""
    config.validate()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        if optimized is not None:
            cpu_fp32 = onnx.load(str(optimized))
        else:
            cpu_fp32, _ = optimize(onnx.load(str(exported)), "onnxruntime", family=family, sparsity="off")
        trt_fp32, _ = optimize(onnx.load(str(exported)), "tensorrt", stages=("cleanup",), family=family)
        # opset 21 once (the blocked DequantizeLinear's): tensorrt_model converts per call otherwise (~2 s each)
        trt_fp32 = with_opset(trt_fp32, MIN_OPSET)
        cpu_path = save_onnx(cpu_fp32, Path(tmp) / "cpu_fp32.onnx")
        data = decoder_calibration.for_decoder(calibration, cpu_path, 0)
        sites = find_sites(cpu_fp32)
        rows = collect_rows(cpu_path, [s.x for s in sites], data)
        judge = Judge(cpu_path, data, config.sensitivity_samples, None)
        block, blocks = effective_block_sizes(cpu_fp32, sites, config)
        prepared = prepare(
            cpu_fp32,
            sites,
            rows,
            method=config.method,
            block_size=block,
            accuracy_level=config.accuracy_level,
            block_sizes=blocks,
        )
        fixed = {
            s.node: config.lm_head_bits()
            for s in sites
            if _is_lm_head(cpu_fp32, s) and config.lm_head != "auto"
        }

        def cpu_cosine(plan: Plan) -> float:
            model, _ = cpu_model(cpu_fp32, plan, config.accuracy_level)
            return judge.search_cosine(save_onnx(model, Path(tmp) / "candidate.onnx"))

        candidates = [s.node for s in sites if s.node not in fixed] + (
            [EMBEDDING] if prepared.embedding else []
        )
        cpu_switch, trt_switch = (
            _session(model, optimize=optimized)
            for model, optimized in zip(
                switchable_models(cpu_fp32, trt_fp32, prepared, fixed, candidates, config.accuracy_level),
                (
                    True,
                    False,
                ),  # the CPU file as ONNX Runtime runs it; the TensorRT file's arithmetic as written
                strict=True,
            )
        )

        def switch(wide: Iterable[str]) -> dict[str, np.ndarray]:
            return {SWITCH_INPUT: np.isin(np.array(candidates), list(wide))}

        measured: dict[frozenset[str], float] = {}

        def cpu_cosine_of(wide: frozenset[str]) -> float:
            """Search cosine of the CPU file with `wide` at 8 bits, each plan measured once."""
            if wide not in measured:
                measured[wide] = judge.switched_cosine(cpu_switch, switch(wide))
            return measured[wide]

        def evaluate(wide: frozenset[str]) -> float:
            """The lower search cosine of the two files (the TensorRT file rounds on its own grid)."""
            return min(cpu_cosine_of(wide), judge.switched_cosine(trt_switch, switch(wide)))

        def sweep(names: Sequence[str]) -> dict[str, float]:
            """Each layer alone at 4 bits, every other at 8, on the CPU file (a ranking: fewer samples)."""
            samples = min(config.sweep_samples, config.sensitivity_samples)
            return {
                n: judge.switched_cosine(cpu_switch, switch(set(candidates) - {n}), samples) for n in names
            }

        target = config.min_cosine + SEARCH_MARGIN * (1.0 - config.min_cosine)
        budget = math.floor(config.max_int8_fraction * len(candidates)) if config.mixed_precision else 0
        # The lm_head last: at 8 bits it adds as many bytes per decode step as ~20 attention projections, so the
        # search first reaches the target without widening it, and widens it only where that fails.
        heads = [s.node for s in sites if s.node in candidates and _is_lm_head(cpu_fp32, s)]
        if config.search == "cost":
            cost = _extra_step_bytes(prepared, candidates)

            def sweep_units(groups: Sequence[tuple[str, ...]]) -> dict[tuple[str, ...], float]:
                samples = min(config.sweep_samples, config.sensitivity_samples)
                return {
                    u: judge.switched_cosine(cpu_switch, switch(set(candidates) - set(u)), samples)
                    for u in groups
                }

            def run_search(names: Sequence[str]):  # type: ignore[no-untyped-def]
                groups = units(cpu_fp32, names, PACKED_PROJECTIONS)
                return search_by_cost(groups, cost, evaluate, target, budget, sweep_units)
        else:

            def run_search(names: Sequence[str]):  # type: ignore[no-untyped-def]
                return search(names, evaluate, target, budget, sweep)

        sensitivity = run_search([n for n in candidates if n not in heads])
        if heads and not sensitivity.met:
            sensitivity = run_search(candidates)
        searched = {**fixed, **dict.fromkeys(sensitivity.excluded, 8)}
        bits = widen_mixed_groups(cpu_fp32, searched, PACKED_PROJECTIONS)
        plan = prepared.plan(bits)
        cpu_file, cpu_ops = cpu_model(
            cpu_fp32,
            plan,
            config.accuracy_level,
            PACKED_PROJECTIONS,
            decode_fusions=True,
            max_positions=config.max_positions,
        )
        trt_file, trt_ops = tensorrt_model(trt_fp32, plan)
        cpu_out, trt_out = save_onnx(cpu_file, work / CPU_FILE), save_onnx(trt_file, work / TENSORRT_FILE)
        cpu_cos = judge.heldout_cosine(cpu_out)
        trt_cos = judge.heldout_cosine(trt_out, fake_quant=True)
        all4 = cpu_cosine_of(frozenset())  # the chosen method's all-4-bit CPU file, measured by the search
        comparison = _method_comparison(cpu_fp32, sites, rows, fixed, cpu_cosine, config, all4, block, blocks)
    report = {
        "method": config.method,
        "method_reason": "measured: README INT4 (AWQ-style input scales + clipping vs round-to-nearest)",
        "block_size": block,
        "block_size_requested": config.block_size,
        "block_sizes_other": dict(blocks),
        "accuracy_level": config.accuracy_level,
        "lm_head_bits": config.lm_head_bits(),
        "lm_head_block_size": max(config.lm_head_block_size, block),
        "target_min_cosine": config.min_cosine,
        "calibration": data.describe(),
        "files": {
            CPU_FILE: "ONNX Runtime CPU (MatMulNBits, symmetric blocks; GatherBlockQuantized embedding)",
            TENSORRT_FILE: "TensorRT (opset 21 DequantizeLinear int4 blocks, zero point 0, feeding MatMul)",
        },
        "cpu": {"file": CPU_FILE, "heldout_cosine": cpu_cos, "ops": cpu_ops["counts"]},
        "tensorrt": {"file": TENSORRT_FILE, "heldout_cosine": trt_cos, "ops": trt_ops["counts"]},
        "int8_layers": sensitivity.excluded
        + sorted(n for n, b in bits.items() if b == 8 and n not in searched),
        "int8_layers_widened_to_pack": sorted(n for n, b in bits.items() if b == 8 and n not in searched),
        "sensitivity": sensitivity.to_json(),
        "search": config.search,
        "sensitivity_rule": "each piece (a packed q/k/v or gate/up group is one) measured alone at 4 bits "
        "(every other at 8) on the CPU file as ONNX Runtime runs it; from all at 4 bits, the pieces go to 8 bits "
        + (
            "in order of error per extra byte read per decode step"
            if config.search == "cost"
            else "worst first"
        )
        + " one by one until the lower search cosine of the two files reaches the target; the lm_head (the "
        "most bytes per decode step) only where the target is out of reach without it",
        "method_comparison_search_cosine": comparison,
        "layers": layer_report(sites, plan),
        "embedding": None
        if plan.embedding is None
        else {"table": plan.embedding[0], "bits": plan.embedding[1].bits},
        "seconds": time.perf_counter() - start,
    }
    gate(report, config.min_cosine)
    return Int4Result(work / CPU_FILE, work / TENSORRT_FILE, report)


def effective_block_sizes(
    model: onnx.ModelProto, sites: Sequence[Site], config: Int4Config
) -> tuple[int, dict[str, int]]:
    """The file's block size and the nodes taking another: `config.block_size` at most the hidden size (the
    embedding's width, else the smallest K; a block longer than K would be padding only), each node's at most
    its own K (a pruned o_proj reads fewer than hidden inputs), the lm_head `config.lm_head_block()`."""
    inits = {i.name: i for i in model.graph.initializer}
    widths = {s.node: int(inits[s.weight].dims[0]) for s in sites}
    table = embedding_table(model)
    hidden = (
        int(inits[table].dims[1]) if table is not None else min(widths.values(), default=config.block_size)
    )
    block = min(config.block_size, _pow2_at_most(hidden))
    blocks = {}
    for site in sites:
        if _is_lm_head(model, site):
            blocks[site.node] = max(config.lm_head_block_size, block)
        elif _pow2_at_most(widths[site.node]) < block:
            blocks[site.node] = _pow2_at_most(widths[site.node])
    return block, blocks


def _pow2_at_most(k: int) -> int:
    """The largest power of two <= k, at least 16 (MatMulNBits' smallest block)."""
    return max(16, 1 << (max(k, 1).bit_length() - 1))


def _extra_step_bytes(prepared: Prepared, candidates: Sequence[str]) -> dict[str, float]:
    """Per candidate, the bytes a decode step reads more at 8 bits than at 4 (the embedding: one row)."""
    cost: dict[str, float] = {}
    for name in candidates:
        if name == EMBEDDING:
            assert prepared.embedding is not None
            hidden = prepared.embedding[1].shape[1]
            cost[name] = step_bytes(hidden, 1, 8, prepared.block_size) - step_bytes(
                hidden, 1, 4, prepared.block_size
            )
            continue
        k, n = prepared.weights[name].shape
        block = prepared.block_of(name)
        cost[name] = step_bytes(k, n, 8, block) - step_bytes(k, n, 4, block)
    return cost


def layer_report(sites: list[Site], plan: Plan) -> list[dict[str, Any]]:
    """Per layer: method, bits, AWQ exponent and input-scale statistics, clip ratio, output error vs RTN's."""
    rows = []
    for site in sites:
        if site.node in plan.reports:
            fold = None if site.fold is None else f"{site.fold[0]}:{site.fold[1]}"
            rows.append({"node": site.node, "scale_folded_into": fold, **plan.reports[site.node].to_json()})
    return rows


def gate(report: dict[str, Any], target: float) -> None:
    misses = {
        k: report[k]["heldout_cosine"] for k in ("cpu", "tensorrt") if report[k]["heldout_cosine"] < target
    }
    report["gate"] = {"target_min_cosine": target, "passed": not misses}
    if misses:
        numbers = ", ".join(f"{k}: held-out logit cosine {v:.5f}" for k, v in misses.items())
        raise ValidationError(
            f"INT4 accuracy gate failed: target mean logit cosine >= {target}; {numbers} with "
            f"{len(report['int8_layers'])} layers at 8 bits (all 4-bit: "
            f"{report['sensitivity']['all_quantized_cosine']:.5f})"
        )


def _method_comparison(
    model, sites, rows, fixed, cosine, config, chosen: float, block, blocks
) -> dict[str, float]:  # type: ignore[no-untyped-def]
    """Search cosine of the all-4-bit CPU file with each method (the chosen one measured by the search's
    own session: its switch all at 4 bits is that file)."""
    result = {config.method: chosen}
    for other in METHODS:
        if other not in result:
            alternative: Prepared = prepare(
                model,
                sites,
                rows,
                method=other,
                block_size=block,
                accuracy_level=config.accuracy_level,
                block_sizes=blocks,
            )
            result[other] = cosine(alternative.plan(fixed))
    return result


def _is_lm_head(model: onnx.ModelProto, site: Site) -> bool:
    outputs = {o.name for o in model.graph.output}
    return any(n.name == site.node and n.output[0] in outputs for n in model.graph.node)


def load_decoder_calibration(
    config: Any, tokenizer_path: Path | None, input_names: list[str], sequence_length: int, vocab_size: int
) -> CalibrationData:
    """Token calibration samples (as the INT8 stage loads them; prefills are added by the stage)."""
    return load_stage_calibration(config, tokenizer_path, input_names, sequence_length, vocab_size)
