"""Pass pipelines per target, as data, and the one entry point `optimize`.

Stages: "cleanup" (shape inference, constant folding, identity/cast removal, CSE, dead nodes),
"fusion" (target-specific), "sparsity" (2:4 tagging / enforcement). The INT8 flow runs cleanup, inserts
Q/DQ, then runs fusion: every fusion rule needs constant float weights to pack them (attention QKV) and
otherwise leaves MatMuls and their Q/DQ nodes in place, so Q/DQ semantics survive the fusion stage.

Targets:
- tensorrt: standard ONNX ops only, opset kept at 17 (LayerNormalization is native). GELU, RMSNorm and
  attention have no opset-17 op: they stay in standard form for TensorRT's own fusions, and the report
  lists them as not applicable with that reason.
- onnxruntime: ONNX Runtime contrib ops where they are faster on CPU (EmbedLayerNormalization, BiasGelu,
  Attention with the 2-D padding mask, SimplifiedLayerNormalization, GroupQueryAttention), and the
  residual bias folded into the LayerNorm before it (fold_residual_bias). SkipLayerNormalization is not
  emitted: measured slower than Add + LayerNormalization on this CPU.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import onnx
import onnx_ir as ir

from export_errors import InputError, ValidationError
from graph_passes.base import GraphPass, PassReport, ReportedPassResult, op_counts
from graph_passes.eliminate_common_subexpressions import EliminateCommonSubexpressions
from graph_passes.expectations import compare, count_sites, expectations, family_kind, has_kv_cache
from graph_passes.fold_constants import FoldConstants
from graph_passes.fold_residual_bias import FoldResidualBias
from graph_passes.fuse_attention import FuseAttention
from graph_passes.fuse_bias_gelu import FuseBiasGelu
from graph_passes.fuse_embed_layernorm import FuseEmbedLayerNorm
from graph_passes.fuse_gelu import FuseGelu
from graph_passes.fuse_gqa import FuseGroupQueryAttention
from graph_passes.fuse_gqa_kv_cache import FuseGroupQueryAttentionKvCache
from graph_passes.fuse_layernorm import FuseLayerNorm
from graph_passes.fuse_matmul_bias import FuseMatMulBias
from graph_passes.fuse_rmsnorm import FuseRmsNorm
from graph_passes.infer_shapes import InferShapes
from graph_passes.remove_dead_nodes import RemoveDeadNodes
from graph_passes.remove_identity_and_casts import RemoveIdentityAndCasts
from graph_passes.tag_sparsity_2to4 import TagSparsity2to4

logger = logging.getLogger(__name__)

Target = Literal["tensorrt", "onnxruntime"]
STAGES = ("cleanup", "fusion", "sparsity")
MS_DOMAIN = "com.microsoft"


class FusionNotAppliedError(ValidationError):
    """strict_fusion: a fusion expected for this family and target did not fire."""

    def __init__(self, report: PipelineReport) -> None:
        self.report = report
        missed = [r for r in report.fusions if r["status"] == "not_applied"]
        lines = [
            f"{r['fusion']} in layer {r['layer']}: {r['applied']}/{r['expected']} ({r.get('reason')})"
            for r in missed
        ]
        super().__init__(
            f"{len(missed)} expected fusion(s) did not fire ({report.target}): " + "; ".join(lines)
        )


def _cleanup() -> list[GraphPass]:
    return [
        InferShapes(),
        FoldConstants(),
        RemoveIdentityAndCasts(),
        EliminateCommonSubexpressions(),
        RemoveDeadNodes(),
        InferShapes(),
    ]


# The pipelines, as data: target -> stage -> ordered pass factories.
PIPELINES: dict[str, dict[str, Callable[[], list[GraphPass]]]] = {
    "tensorrt": {
        "cleanup": _cleanup,
        "fusion": lambda: [InferShapes(), FuseLayerNorm(), RemoveDeadNodes()],
    },
    "onnxruntime": {
        "cleanup": _cleanup,
        "fusion": lambda: [
            InferShapes(),
            FuseLayerNorm(),
            FuseEmbedLayerNorm(),
            FuseRmsNorm(),
            FuseGelu(),
            FuseBiasGelu(),
            # FuseSkipLayerNorm is not run: ORT's SkipLayerNormalization CPU kernel measured slower than
            # Add + LayerNormalization on all-MiniLM-L6-v2 (0.89x vs 1.00x at 1x128, 0.86x vs 0.94x at 8x128,
            # 2 threads), and engines.OnnxRuntimeRunner disables ORT's own SkipLayerNormFusion to match.
            FuseMatMulBias(),
            # FuseAttention measured faster than leaving attention to ORT's session fusions (FusedMatMul +
            # Softmax) at both shapes on all-MiniLM-L6-v2, 2 threads, interleaved in rotated order:
            # 17.0 vs 17.7 ms at 1x128, 124 vs 127 ms at 8x128. So it runs at every batch size.
            FuseAttention(),
            FuseGroupQueryAttention(),
            FuseGroupQueryAttentionKvCache(),
            FoldResidualBias(),
            EliminateCommonSubexpressions(),
            RemoveDeadNodes(),
        ],
    },
}


@dataclasses.dataclass
class PipelineReport:
    """What the pipeline did: per pass counts and time, and per layer fusions expected vs applied."""

    target: str
    family: str | None
    kind: str
    stages: list[str]
    passes: list[PassReport] = dataclasses.field(default_factory=list)
    fusions: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    op_counts_before: dict[str, int] = dataclasses.field(default_factory=dict)
    op_counts_after: dict[str, int] = dataclasses.field(default_factory=dict)
    seconds: float = 0.0

    @property
    def missed(self) -> list[dict[str, Any]]:
        return [r for r in self.fusions if r["status"] == "not_applied"]

    def to_json(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "family": self.family,
            "kind": self.kind,
            "stages": self.stages,
            "seconds": round(self.seconds, 4),
            "passes": [p.to_json() | {"seconds": round(p.seconds, 4)} for p in self.passes],
            "fusions": self.fusions,
            "fusions_missed": len(self.missed),
            "op_counts_before": self.op_counts_before,
            "op_counts_after": self.op_counts_after,
        }


def optimize(
    model: onnx.ModelProto,
    target: Target,
    *,
    stages: Sequence[str] = STAGES,
    family: str | None = None,
    strict_fusion: bool = False,
    sparsity: Literal["tag", "enforce", "off"] = "tag",
    on_cleaned: Callable[[ir.Model, PipelineReport], None] | None = None,
) -> tuple[onnx.ModelProto, PipelineReport]:
    """Run the `target` pipeline's `stages` on `model` (not modified) and return the new model and report.

    Raises InputError for an unknown target / stage / family / sparsity mode, FusionNotAppliedError when
    `strict_fusion` and an expected fusion did not fire, GraphPassError (naming the pass) on a pass failure.
    `on_cleaned`: see `optimize_ir`.
    """
    ir_model, report = optimize_ir(
        ir.serde.deserialize_model(model),
        target,
        stages=stages,
        family=family,
        strict_fusion=strict_fusion,
        sparsity=sparsity,
        on_cleaned=on_cleaned,
    )
    return ir.serde.serialize_model(ir_model), report


def optimize_file(
    source: Path,
    target_path: Path,
    target: Target,
    *,
    family: str | None = None,
    strict_fusion: bool = False,
    sparsity: Literal["tag", "enforce", "off"] = "tag",
) -> PipelineReport:
    """`optimize` from file to file without holding the weights: onnx-ir loads the external data lazily
    (each tensor read when a pass asks for its values) and `ir.save` streams the weights into one
    `<target name>.data` beside `target_path`, 64 KiB-aligned. For the streaming export's large models."""
    ir_model, report = optimize_ir(
        ir.load(str(source)), target, family=family, strict_fusion=strict_fusion, sparsity=sparsity
    )
    save_streamed(ir_model, target_path)
    return report


def save_streamed(ir_model: ir.Model, path: Path, alignment: int = 64 * 1024) -> None:
    """`ir_model` at `path`, its weights streamed into one `<name>.data` (`alignment`-aligned), each lazily
    read tensor unmapped once the next is written: a large model's weights never all sit in memory."""
    written: list[Any] = []

    def release_written(tensor: Any, info: Any) -> None:
        # a lazily read tensor stays memory-mapped until released: drop each one once the next is reached
        while written:
            previous = written.pop()
            if isinstance(previous, ir.ExternalTensor):
                previous.release()
        written.append(tensor)

    ir.save(
        ir_model,
        str(path),
        external_data=path.name + ".data",
        alignment=alignment,
        callback=release_written,
        max_workers=1,
        max_in_flight_bytes=256 * 2**20,
    )


def optimize_ir(
    ir_model: ir.Model,
    target: Target,
    *,
    stages: Sequence[str] = STAGES,
    family: str | None = None,
    strict_fusion: bool = False,
    sparsity: Literal["tag", "enforce", "off"] = "tag",
    on_cleaned: Callable[[ir.Model, PipelineReport], None] | None = None,
) -> tuple[ir.Model, PipelineReport]:
    """`optimize` on an onnx-ir model, changed in place and returned. `on_cleaned(model, report)` is called
    once the cleanup stage has run, before any fusion changes the graph, with a report of that stage alone:
    the cleanup passes are the same for every target, so the INT8 stage (which calibrates the cleaned,
    unfused graph) takes it from here instead of running them again on the exported file."""
    _validate(target, stages, sparsity)
    start = time.perf_counter()
    kind = family_kind(family, ir_model)
    report = PipelineReport(target, family, kind, list(stages), op_counts_before=dict(op_counts(ir_model)))
    for stage in STAGES:
        if stage not in stages:
            continue
        if stage == "fusion":
            _run_fusion(ir_model, target, kind, report)
        elif stage == "sparsity":
            if sparsity != "off":
                _run(TagSparsity2to4(mode=sparsity), ir_model, report)
        else:
            for graph_pass in PIPELINES[target][stage]():
                _run(graph_pass, ir_model, report)
        if stage == "cleanup" and on_cleaned is not None:
            on_cleaned(ir_model, _cleanup_report(report, ir_model, start))
    _import_contrib_domain(ir_model)
    report.op_counts_after = dict(op_counts(ir_model))
    report.seconds = time.perf_counter() - start
    if strict_fusion and report.missed:
        raise FusionNotAppliedError(report)
    for row in report.missed:
        logger.warning(
            "fusion %s not applied in layer %s: %s", row["fusion"], row["layer"], row.get("reason")
        )
    return ir_model, report


def _cleanup_report(report: PipelineReport, model: ir.Model, start: float) -> PipelineReport:
    """The report of the cleanup stage alone (it runs first): what `optimize(..., stages=("cleanup",))` says."""
    return dataclasses.replace(
        report,
        stages=["cleanup"],
        passes=list(report.passes),
        op_counts_after=dict(op_counts(model)),
        seconds=time.perf_counter() - start,
    )


def _validate(target: str, stages: Sequence[str], sparsity: str) -> None:
    if target not in PIPELINES:
        raise InputError("--target", f"unknown target {target!r}; choose one of {sorted(PIPELINES)}")
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise InputError("stages", f"unknown stage(s) {unknown}; the stages are {list(STAGES)}")
    if sparsity not in ("tag", "enforce", "off"):
        raise InputError("--sparsity", f"unknown mode {sparsity!r}; choose tag, enforce or off")


def _run(graph_pass: GraphPass, model: ir.Model, report: PipelineReport) -> None:
    result = graph_pass(model)
    assert isinstance(result, ReportedPassResult)  # every pass here is a GraphPass
    report.passes.append(result.report)
    logger.info("%s: %s (%.3f s)", graph_pass.name, result.report.counts, result.report.seconds)


def _run_fusion(model: ir.Model, target: str, kind: str, report: PipelineReport) -> None:
    exps = expectations(kind, target, kv_cache=has_kv_cache(model))
    first = len(report.passes)
    passes = PIPELINES[target]["fusion"]()
    _run(passes[0], model, report)  # shape inference: the site counters and rule checks read shapes
    sites = count_sites(model, exps)
    for graph_pass in passes[1:]:
        _run(graph_pass, model, report)
    report.fusions = compare(model, exps, sites, report.passes[first:])


def _import_contrib_domain(model: ir.Model) -> None:
    uses_contrib = any(n.domain == MS_DOMAIN for n in ir.traversal.RecursiveGraphIterator(model.graph))
    if uses_contrib and MS_DOMAIN not in model.opset_imports:
        model.opset_imports[MS_DOMAIN] = 1
