"""INT8 from calibration: two artifacts, one per backend, each checked against fp32 on held-out data.

- `model.int8.onnx` (TensorRT): Q/DQ placed by TensorRT's rules (graph_passes/insert_qdq.py) with static
  symmetric activation ranges calibrated on the *unfused* fp32 graph (fusing first hides the tensors that
  need ranges and breaks static quantization: onnxruntime #8770). Target fusions come after, and must keep
  the Q/DQ semantics. Its accuracy is measured by running it in ONNX Runtime with optimizations off, which
  executes the Q/DQ arithmetic exactly (fake quantization).
- `model.int8.cpu.onnx` (ONNX Runtime CPU): dynamic u8 activations x per-channel s8 weights
  (exporter/quantize/cpu_int8.py), which ORT runs with integer kernels, and embedding tables INT8 per row
  (exporter/quantize/embeddings.py); its accuracy is measured as ORT runs it.

For each artifact the automatic sensitivity search (exporter/quantize/sensitivity.py) ranks every layer by the
error it causes when quantized alone (one switchable fake-quant graph, one session), then treats the worst
ones until mean token cosine vs fp32 reaches the target (with a margin, on calibration samples): in the
TensorRT file a treated layer stays in high precision; in the CPU file its few outlier input channels go to a
thin fp32 MatMul and the rest stays INT8 (exporter/quantize/outliers.py). The gate then checks the target on
the held-out samples and raises `ValidationError` with the numbers if it is missed. SmoothQuant-style
migration (exporter/quantize/smooth.py) is applied before the TensorRT variant (measured: fewer layers kept in
high precision). Every decision and the rule behind it goes into `QuantResult.report`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import shutil
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
from onnx.external_data_helper import uses_external_data

from export_errors import InputError, ValidationError
from exporter import progress
from exporter.export.external_data import save_onnx
from exporter.quantize import cpu_int8 as quantize_cpu
from exporter.quantize import early_stop
from exporter.quantize.calibration import CalibrationData
from exporter.quantize.cpu_features import WEIGHT_RANGES, WeightRange, reduce_weight_range
from exporter.quantize.early_stop import EarlyStop
from exporter.quantize.embeddings import QuantizedTable, quantize_embeddings
from exporter.quantize.fake_quant import fold_weight_dequantize
from exporter.quantize.outliers import SUFFIX, split_outliers
from exporter.quantize.ranges import DEFAULT_PERCENTILE, METHODS, Maxima, cached_channel_max, collect_ranges
from exporter.quantize.sensitivity import SWITCH_INPUT, SensitivityResult, search, switchable_model
from exporter.validate.tolerances import tolerance
from graph_passes.insert_qdq import Decision, Exclusions, InsertQDQ, activation_tensors, plan

logger = logging.getLogger(__name__)

TENSORRT_FILE = "model.int8.onnx"
CPU_FILE = "model.int8.cpu.onnx"
# The greedy search aims this fraction of the way from the target to 1, so that the held-out check has room.
SEARCH_MARGIN = 0.25
# Samples per judged run (length-sorted, cut to real tokens): fewer, fuller runs than the calibration batch.
JUDGE_BATCH = 8
# Sessions the sensitivity sweep runs side by side, one thread each (the export's 2 cores).
SWEEP_WORKERS = 2
# A reference maps feeds to the fp32 output the INT8 model is judged against (first model output).
Reference = Callable[[dict[str, np.ndarray]], np.ndarray]


@dataclasses.dataclass
class QuantConfig:
    """What the INT8 step does. Defaults are the measured best on all-MiniLM-L6-v2 (README)."""

    method: str = "mse"  # measured best on MiniLM (README): all-quantized held-out cosine 0.977
    percentile: float = DEFAULT_PERCENTILE
    min_cosine: float = tolerance("int8").min_mean_cosine or 0.99
    exclude_names: tuple[str, ...] = ()
    exclude_op_types: tuple[str, ...] = ()
    exclude_regex: tuple[str, ...] = ()
    smoothing: bool = (
        True  # SmoothQuant migration for the TensorRT variant (MiniLM: 6 instead of 9 layers kept fp)
    )
    num_samples: int | None = None  # calibration samples for ranges (None: all in CalibrationData)
    sensitivity_samples: int = 16  # calibration samples the sensitivity search is measured on
    batch: int | None = None  # None: CalibrationData.batch
    max_excluded_fraction: float = 0.5  # sensitivity may keep at most this share of layers in high precision
    auto_exclude: bool = True
    cpu_variant: bool = True
    cpu_fusion: bool = False  # ORT's Attention fusion + QAttention measured slower than the unfused graph
    # Our onnxruntime-target fusions (graph_passes) before the CPU variant, for this family (None: off).
    # Set for KV-cache decoders by exporter/quantize/int8_stage.py: GroupQueryAttention is not quantized, the
    # projections around it are, and the fused file is faster (measured there).
    cpu_graph_passes_family: str | None = None
    # That pipeline's output on the graph being quantized where the export already ran it (graph_passes'
    # onnxruntime model.onnx, sparsity tags aside): used instead of running the fusions again.
    cpu_fused_source: Path | None = None
    # that file's max abs error where the export already checked it against the PyTorch reference under the
    # fp32 gate (its `optimized_fp32` check): the fused graph is accepted on that check instead of running it
    # again on the search samples vs the cleaned graph (the 45M Llama: 0.57 s, a 221 MB graph's forward pass)
    cpu_fused_checked: float | None = None
    # sensitive CPU layers: this many outlier input channels go to a thin fp32 MatMul (0: whole layer fp32)
    cpu_outlier_channels: int = 4
    num_heads: int = 0  # for ONNX Runtime's Attention fusion in the CPU variant (0: detect from the graph)
    hidden_size: int = 0
    # CPU file's weights: 8-bit ("full"), 7-bit ("reduced") or by this CPU's integer kernel ("auto")
    cpu_weight_range: WeightRange = "auto"
    # CPU file's embedding tables INT8 per row (exporter/quantize/embeddings.py); False keeps them fp32
    cpu_embeddings_int8: bool = True

    def exclusions(self) -> Exclusions:
        return Exclusions.of(self.exclude_names, self.exclude_op_types, self.exclude_regex)

    def validate(self) -> None:
        if self.method not in METHODS:
            raise InputError("--calibration-method", f"unknown method {self.method!r}; choose from {METHODS}")
        if not 0.0 < self.min_cosine <= 1.0:
            raise InputError("--int8-min-cosine", f"must be in (0, 1], got {self.min_cosine}")
        if self.cpu_weight_range not in WEIGHT_RANGES:
            raise InputError(
                "--cpu-int8-weights", f"choose from {WEIGHT_RANGES}, got {self.cpu_weight_range!r}"
            )


@dataclasses.dataclass
class QuantResult:
    tensorrt_path: Path  # OUT_DIR/model.int8.onnx: Q/DQ for TensorRT
    cpu_path: Path | None  # OUT_DIR/model.int8.cpu.onnx: the ONNX Runtime CPU engine's model
    report: dict[str, Any]
    cosine: float  # held-out mean token cosine vs fp32 of the TensorRT artifact (as ORT executes its Q/DQ)
    cpu_cosine: float | None = None
    openvino_path: Path | None = None  # model.int8.openvino.onnx (exporter/quantize/int8_stage.py)
    heldout: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)  # the held-out feeds judged on
    # the TensorRT file's graph as written, when its weights stayed inline (the stage's target fusion takes it
    # instead of reading the file back; `take_tensorrt_model` hands it over once)
    tensorrt_model: onnx.ModelProto | None = dataclasses.field(default=None, repr=False)
    # the held-out judge's session of that graph: its Q/DQ executed as written (optimizations off, the weights'
    # DequantizeLinear folded: the same bits as a session of the file), for checks of the same graph
    tensorrt_session: ort.InferenceSession | None = dataclasses.field(default=None, repr=False)

    def take_tensorrt_model(self) -> onnx.ModelProto:
        """The TensorRT file's graph: the one kept in memory (handed over: the result lets go of it), else read."""
        model, self.tensorrt_model = self.tensorrt_model, None
        return model if model is not None else onnx.load(str(self.tensorrt_path))


def quantize(
    fp32_onnx: Path,
    out_dir: Path,
    calibration: CalibrationData,
    config: QuantConfig | None = None,
    reference: Reference | None = None,
    cpu_first_build: quantize_cpu.BackgroundBuild | None = None,
) -> QuantResult:
    """Calibrate, place Q/DQ, exclude sensitive layers, gate on held-out accuracy; write both artifacts.
    `cpu_first_build`: the CPU file's first build already started (`start_cpu_first_build`): taken if it is
    the build needed, else stopped."""
    config = config or QuantConfig()
    config.validate()
    fp32_onnx, out_dir = Path(fp32_onnx), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if config.batch:
        calibration = dataclasses.replace(calibration, batch=config.batch)
    judge = Judge(fp32_onnx, calibration, config.sensitivity_samples, reference)
    report: dict[str, Any] = {"calibration": calibration.describe(), "target_min_cosine": config.min_cosine}
    maxima = Maxima()  # per (file, tensor), measured once
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        # the CPU file's first build (everything quantized) starts now, beside the TensorRT file's passes
        prep = (
            _prepare_cpu(fp32_onnx, Path(tmp), config, judge, cpu_first_build) if config.cpu_variant else None
        )
        if prep is None and cpu_first_build is not None:
            cpu_first_build.close()
        stack.callback(lambda: prep.first.close() if prep is not None and prep.first is not None else None)
        source, loaded = fp32_onnx, None
        if config.smoothing:
            from exporter.quantize.smooth import smooth

            # the Q/DQ activations' maxima come in the same pass: the ranges' first pass when nothing is smoothed
            loaded = onnx.load(str(fp32_onnx))  # read once: smoothing reads it, and the Q/DQ file's passes
            activations = activation_tensors(plan(ir.from_proto(loaded), config.exclusions()))
            source, report["smoothing"] = smooth(
                fp32_onnx, Path(tmp), calibration, config, cache=maxima, also=activations, model=loaded
            )
        trt_cosine, trt_model, trt_session = _tensorrt_variant(
            source,
            out_dir / TENSORRT_FILE,
            calibration,
            config,
            judge,
            report,
            maxima,
            loaded if source == fp32_onnx else None,  # unchanged: nothing was smoothed
        )
        del loaded
        cpu_path, cpu_cosine = None, None
        if prep is not None:
            cpu_path = out_dir / CPU_FILE
            cpu_cosine = _cpu_variant(prep, cpu_path, Path(tmp), config, judge, report, maxima)
    report["files"] = {
        TENSORRT_FILE: "TensorRT (explicit Q/DQ, symmetric s8, static ranges)",
        **(
            {
                CPU_FILE: "ONNX Runtime CPU (dynamic u8 activations x per-channel s8 weights; sensitive layers split; "
                "embeddings INT8 per row)"
            }
            if cpu_path
            else {}
        ),
    }
    _gate(report, config.min_cosine)
    return QuantResult(
        out_dir / TENSORRT_FILE,
        cpu_path,
        report,
        trt_cosine,
        cpu_cosine,
        heldout=calibration.heldout,
        tensorrt_model=trt_model,
        tensorrt_session=trt_session,
    )


def _tensorrt_variant(
    fp32: Path,
    out: Path,
    data: CalibrationData,
    config: QuantConfig,
    judge: Judge,
    report: dict[str, Any],
    maxima: Maxima | None = None,
    proto: onnx.ModelProto | None = None,
) -> tuple[float, onnx.ModelProto | None, ort.InferenceSession | None]:
    """Held-out cosine of the TensorRT file written at `out`, its graph where the weights stayed inline, and the
    session that judged it (`QuantResult.tensorrt_session`).
    `proto`: the graph of `fp32`, already read (not changed here)."""
    start = time.perf_counter()
    proto = proto if proto is not None else onnx.load(str(fp32))
    decisions = plan(ir.from_proto(proto), config.exclusions())
    names = activation_tensors(decisions)
    known = maxima.absmax(fp32, names) if maxima is not None else {}
    session = maxima.take_session(fp32) if maxima is not None else None
    values = maxima.take_values(fp32) if maxima is not None else None
    with ThreadPoolExecutor(1) as pool:
        if values:
            # histograms of kept values are numpy on one core: the fp32 references (ONNX Runtime) run beside,
            # the search samples' first (where the CPU file's fusion check has not made them), then the
            # held-out ones, which, where they outlast the histograms, go on beside the search's own Python
            # (Q/DQ graph built, weights folded, serialized: one core) until the held-out check needs them
            # (the 45M Llama waited ~0.5 s for them before the search)
            judge.prepare_in(pool, "calibration")
            judge.prepare_in(pool, "heldout")
        ranges = collect_ranges(
            proto, names, data, config.method, config.percentile, config.num_samples, known, session, values
        )
        del session, values
        cosine, final, sensitivity, pass_report = _search_and_judge(
            proto, decisions, ranges, config, judge, out
        )
    report["tensorrt"] = {
        "file": out.name,
        "method": config.method,
        "percentile": config.percentile if config.method == "percentile" else None,
        "ranges": ranges,
        "heldout_cosine": cosine,
        "heldout_judged": judge.last_heldout,
        "sensitivity": sensitivity.to_json(),
        "auto_excluded": sensitivity.excluded,
        "decisions": [d for d in pass_report["details"] if "node" in d],
        "high_precision_ops": [d for d in pass_report["details"] if "node" not in d],
        "counts": pass_report["counts"],
        "seconds": time.perf_counter() - start,
    }
    logger.info(
        "INT8 TensorRT variant: held-out cosine %.5f, %d layers kept high precision",
        cosine,
        len(sensitivity.excluded),
    )
    inline = not any(uses_external_data(t) for t in final.graph.initializer)  # save_onnx moves large weights
    return cosine, final if inline else None, judge.last_session()


def _search_and_judge(
    proto: onnx.ModelProto,
    decisions: list[Decision],
    ranges: dict[str, float],
    config: QuantConfig,
    judge: Judge,
    out: Path,
) -> tuple[float, onnx.ModelProto, SensitivityResult, dict[str, Any]]:
    """The sensitivity search over the Q/DQ graphs of `proto` with `ranges`; the final graph saved at `out` and
    judged on the held-out samples: (held-out cosine, final graph, search result, InsertQDQ's report)."""
    candidates = [d.node for d in decisions if d.quantized]

    built: dict[frozenset[str], tuple[onnx.ModelProto, Any]] = {}

    def build(excluded: frozenset[str]) -> onnx.ModelProto:
        """The Q/DQ model without `excluded`; each set built once (the search's last is the final file)."""
        if excluded not in built:
            model = ir.from_proto(proto)
            result = InsertQDQ(ranges, config.exclusions().with_names(excluded))(model)
            built[excluded] = ir.to_proto(model), result.report
        build.report = built[excluded][1]  # type: ignore[attr-defined]
        return built[excluded][0]

    layers = {d.node: {**d.weights, **dict.fromkeys(d.activations)} for d in decisions if d.quantized}
    sweep = lambda names: judge.sweep(switchable_model(proto, layers, ranges), list(layers))  # noqa: E731
    sensitivity = _search(
        candidates, lambda ex: judge.search_cosine(build(ex), fake_quant=True), config, sweep
    )
    final = build(frozenset(sensitivity.excluded))
    save_onnx(final, out)
    cosine = judge.heldout_cosine(final, fake_quant=True, target=config.min_cosine)
    return cosine, final, sensitivity, build.report.to_json()  # type: ignore[attr-defined]


# The CPU file's first build runs in a child interpreter (ONNX Runtime's quantizer is single-threaded Python:
# 5 s on the 45M Llama) while this process calibrates the TensorRT file, for sources of at least this size.
BACKGROUND_BUILD_BYTES = 32 * 2**20


@dataclasses.dataclass
class _CpuPrep:
    """What the CPU file is built from, decided before the TensorRT file (its first build may be under way)."""

    source: Path
    fusion: dict[str, Any]
    graph: onnx.ModelProto
    quantizable: list[str]
    user_excluded: frozenset[str]
    reduce_range: bool
    range_reason: str
    first: quantize_cpu.BackgroundBuild | None
    seconds: float
    strip_metadata: str | None = None  # node metadata the builds drop (model.onnx's sparsity tags)


def start_cpu_first_build(tmp: Path, config: QuantConfig) -> quantize_cpu.BackgroundBuild | None:
    """The CPU file's first build (everything quantized) from `config.cpu_fused_source`, started before
    `quantize` runs: as soon as the export's model.onnx exists, so that the child interpreter's ~5 s of CPU
    fall beside the export's own checks and the INT8 stage's set-up (~1.2 cores busy) rather than beside its
    calibration pass (2). None where `quantize` would not build it in the background: no fused source, user
    exclusions (matched on the graph later), a source under `BACKGROUND_BUILD_BYTES`. `tmp` outlives it."""
    source = config.cpu_fused_source
    if source is None or config.exclusions():
        return None
    if Path(source).stat().st_size < BACKGROUND_BUILD_BYTES:
        return None
    reduce_range, _ = reduce_weight_range(config.cpu_weight_range)
    strip = _strip_key(source, config)
    return quantize_cpu.BackgroundBuild(source, tmp / "cpu_candidate0.onnx", frozenset(), reduce_range, strip)


def _prepare_cpu(
    fp32: Path,
    tmp: Path,
    config: QuantConfig,
    judge: Judge,
    started: quantize_cpu.BackgroundBuild | None = None,
) -> _CpuPrep:
    start = time.perf_counter()
    source, fusion = _fused_or_plain(fp32, tmp, judge, config)
    graph = onnx.load(str(source))  # read once for the node lists below (the file stays the source)
    if fusion.get("applied") and fusion.get("ops") is None:
        fusion["ops"] = _op_counts(graph)
    quantizable = quantize_cpu.candidates(graph)
    user_excluded = _user_excluded(graph, config.exclusions()) & frozenset(quantizable)
    reduce_range, range_reason = reduce_weight_range(config.cpu_weight_range)
    strip = _strip_key(source, config)
    first = None
    if started is not None and started.builds(source, user_excluded, reduce_range, strip):
        first = started  # the build this needs, started early (`start_cpu_first_build`)
    elif started is not None:
        started.close()  # e.g. the fused graph failed its check: the plain graph is the source
    if first is None and source.stat().st_size >= BACKGROUND_BUILD_BYTES:  # all quantized: the first build
        first = quantize_cpu.BackgroundBuild(
            source, tmp / "cpu_candidate0.onnx", user_excluded, reduce_range, strip
        )
    return _CpuPrep(
        source,
        fusion,
        graph,
        quantizable,
        user_excluded,
        reduce_range,
        range_reason,
        first,
        time.perf_counter() - start,
        strip,
    )


def _cpu_variant(
    prep: _CpuPrep,
    out: Path,
    tmp: Path,
    config: QuantConfig,
    judge: Judge,
    report: dict[str, Any],
    maxima: Maxima | None = None,
) -> float:
    start = time.perf_counter() - prep.seconds
    source, fusion, graph, user_excluded = prep.source, prep.fusion, prep.graph, prep.user_excluded
    reduce_range, range_reason = prep.reduce_range, prep.range_reason
    candidates = [n for n in prep.quantizable if n not in user_excluded]
    split = _outlier_split(source, candidates, tmp, config, judge.data, maxima, graph)

    built: dict[frozenset[str], Path] = {}

    def build(treated: frozenset[str]) -> Path:
        """Quantize all but `treated`: those get the outlier split (if possible) or stay in fp32. Each set
        is built once (the search's last evaluation is the final file: ONNX Runtime's quantizer is slow)."""
        if treated not in built:
            model_path, fp32_nodes = split(treated)
            excluded = fp32_nodes | user_excluded
            out = tmp / f"cpu_candidate{len(built)}.onnx"
            background = prep.first.result() if prep.first is not None and not treated else None
            built[treated] = background or quantize_cpu.build(
                model_path, out, excluded, reduce_range, prep.strip_metadata
            )
        return built[treated]

    layers = quantize_cpu.layer_inputs(graph, candidates)
    del graph, prep.graph
    sweep = lambda names: judge.sweep(switchable_model(onnx.load(str(source)), layers, None), candidates)  # noqa: E731
    sensitivity = _search(candidates, lambda ex: judge.search_cosine(build(ex)), config, sweep)
    final = build(frozenset(sensitivity.excluded))
    tables: list[QuantizedTable] = []
    if config.cpu_embeddings_int8:
        model, tables = quantize_embeddings(onnx.load(str(final)))
        save_onnx(model, out)
    else:
        shutil.copyfile(final, out)
    cosine = judge.heldout_cosine(out, target=config.min_cosine)
    report["cpu"] = {
        "file": out.name,
        "scheme": "dynamic per-tensor u8 activations x per-channel s8 weights (ONNX Runtime quantize_dynamic)",
        "fusion": fusion,
        "weight_bits": 7 if reduce_range else 8,
        "weight_bits_reason": range_reason,
        "quantized": [n for n in candidates if n not in sensitivity.excluded],
        "user_excluded": sorted(user_excluded),
        "auto_excluded": sensitivity.excluded,
        "outlier_split": {
            "channels": config.cpu_outlier_channels,
            "layers": split.splittable(sensitivity.excluded),
        },
        "fp32_layers": sorted(
            split(frozenset(sensitivity.excluded))[1] - {n + SUFFIX for n in sensitivity.excluded}
        ),
        "sensitivity": sensitivity.to_json(),
        "embeddings": [t.to_json() for t in tables],
        "heldout_cosine": cosine,
        "heldout_judged": judge.last_heldout,
        "ort_optimized_graph_ops": quantize_cpu.integer_kernel_counts(out),
        "seconds": time.perf_counter() - start,
    }
    logger.info("INT8 CPU variant: held-out cosine %.5f", cosine)
    return cosine


def _outlier_split(
    source: Path,
    candidates: list[str],
    tmp: Path,
    config: QuantConfig,
    data: CalibrationData,
    maxima: Maxima | None = None,
    base: onnx.ModelProto | None = None,
):  # type: ignore[no-untyped-def]
    """`split(treated) -> (model path, nodes to keep fp32)`: treated MatMuls get the outlier-channel split
    (exporter/quantize/outliers.py) when `config.cpu_outlier_channels` > 0, the rest stay fp32."""
    base = base if base is not None else onnx.load(str(source))
    inputs = {n.name: n.input[0] for n in base.graph.node if n.name in candidates}
    inits = {i.name: len(i.dims) for i in base.graph.initializer}
    splittable = {
        n.name
        for n in base.graph.node
        if n.name in candidates
        and n.op_type == "MatMul"
        and inits.get(n.input[1]) == 2
        and config.cpu_outlier_channels
    }
    measured: dict[str, np.ndarray] = {}

    def channel_maxima() -> dict[str, np.ndarray]:
        """Measured when a layer is first treated (a search that treats none needs no pass)."""
        if not measured:
            tensors = sorted({inputs[n] for n in splittable})
            measured.update(cached_channel_max(maxima, source, base, tensors, data, tmp, config.num_samples))
        return measured

    def split(treated: frozenset[str]) -> tuple[Path, frozenset[str]]:
        if not any(n in splittable for n in treated):
            return source, treated
        chosen = {n: channel_maxima()[inputs[n]] for n in treated if n in splittable}
        model = split_outliers(onnx.load(str(source)), chosen, config.cpu_outlier_channels)
        path = tmp / "cpu_split.onnx"
        save_onnx(model, path)
        return path, (treated - chosen.keys()) | {n + SUFFIX for n in chosen}

    split.splittable = lambda names: [n for n in names if n in splittable]  # type: ignore[attr-defined]
    return split


def _search(candidates, evaluate, config, sweep):  # type: ignore[no-untyped-def]
    target = config.min_cosine + SEARCH_MARGIN * (1.0 - config.min_cosine)
    budget = math.floor(config.max_excluded_fraction * len(candidates)) if config.auto_exclude else 0
    return search(candidates, evaluate, target, budget, sweep)


def _fused_or_plain(fp32: Path, tmp: Path, judge: Judge, config: QuantConfig) -> tuple[Path, dict[str, Any]]:
    """Our onnxruntime-target fusions (`cpu_graph_passes_family`) or ORT's transformer fusions
    (`cpu_fusion`) if they keep fp32 outputs within tolerance, else the plain graph. The export's model.onnx
    (`cpu_fused_source`) already passed the fp32 gate against PyTorch where `cpu_fused_checked` is given: that
    check stands (the same file, a tighter bound than the 10x below), it is not run again."""
    if not config.cpu_fusion and not config.cpu_graph_passes_family:
        return fp32, {"applied": False, "reason": "disabled"}
    fused = tmp / "fused.onnx"
    try:
        if config.cpu_graph_passes_family and config.cpu_fused_source is not None:
            # the export's model.onnx as it is: ONNX Runtime ignores its 2:4 sparsity tags, and the CPU file's
            # builds drop them from what they write (`quantize_cpu.build`'s `strip_metadata`)
            fused, ops = config.cpu_fused_source, None  # counted from the graph `_prepare_cpu` reads
            if config.cpu_fused_checked is not None:
                return fused, {
                    "applied": True,
                    "ops": None,
                    "max_abs_vs_fp32": config.cpu_fused_checked,
                    "checked_by": "the export's check of model.onnx vs the PyTorch reference (optimized_fp32)",
                }
        elif config.cpu_graph_passes_family:
            ops = _our_fusions(fp32, fused, config.cpu_graph_passes_family)
        else:
            ops = quantize_cpu.fuse_transformer(fp32, fused, config.num_heads, config.hidden_size)
    except Exception as exc:  # a fusion failure costs speed, not correctness: report it and go on
        return fp32, {"applied": False, "reason": f"fusion failed: {exc}"}
    max_abs = judge.max_abs_vs_reference(fused)
    bound = tolerance("fp32").max_abs or 1e-4
    if max_abs > bound * 10:
        return fp32, {
            "applied": False,
            "reason": f"fused graph max abs error {max_abs:.3g} > {bound * 10:.3g}",
            "ops": ops if ops is not None else _op_counts(onnx.load(str(fused))),
        }
    return fused, {"applied": True, "ops": ops, "max_abs_vs_fp32": max_abs}


def _our_fusions(fp32: Path, out: Path, family: str) -> dict[str, int]:
    """graph_passes' onnxruntime pipeline (cleanup + fusion, no sparsity tags) on `fp32`; op counts after."""
    from graph_passes.pipeline import optimize

    model, report = optimize(onnx.load(str(fp32)), "onnxruntime", family=family, sparsity="off")
    save_onnx(model, out)
    return {op: count for op, count in report.op_counts_after.items() if count}


def _op_counts(model: onnx.ModelProto) -> dict[str, int]:
    """Op type -> count, main graph and subgraphs, the zero counts left out (as graph_passes reports them)."""
    from graph_passes.base import op_counts

    return {op: count for op, count in op_counts(ir.from_proto(model)).items() if count}


def _strip_key(source: Path, config: QuantConfig) -> str | None:
    """The node metadata key the CPU file's builds drop: the 2:4 sparsity tags when the source is the export's
    tagged model.onnx (what `_our_fusions` writes for the same graph has none)."""
    if config.cpu_fused_source is None or Path(source) != Path(config.cpu_fused_source):
        return None
    from graph_passes.tag_sparsity_2to4 import METADATA_KEY

    return METADATA_KEY


def _user_excluded(model: onnx.ModelProto, exclusions: Exclusions) -> frozenset[str]:
    if not exclusions:
        return frozenset()
    graph = ir.from_proto(model).graph
    return frozenset(n.name for n in graph if n.name and exclusions.reason(n))


def _gate(report: dict[str, Any], target: float) -> None:
    misses = {
        name: report[name]["heldout_cosine"]
        for name in ("tensorrt", "cpu")
        if name in report and report[name]["heldout_cosine"] < target
    }
    report["gate"] = {"target_min_cosine": target, "passed": not misses}
    if misses:
        numbers = ", ".join(
            f"{name}: held-out mean token cosine {c:.5f} with {len(report[name]['auto_excluded'])} layers in "
            f"high precision (all quantized: {report[name]['sensitivity']['all_quantized_cosine']:.5f})"
            for name, c in misses.items()
        )
        raise ValidationError(f"INT8 accuracy gate failed: target mean token cosine >= {target}; {numbers}")


def max_abs_on_real_tokens(ref: np.ndarray, out: np.ndarray, mask: np.ndarray | None) -> float:
    """Largest |ref - out| over the real tokens only. A padded position's output is never read (attention
    and pooling mask it), and a fused attention kernel (GroupQueryAttention) fills it differently from the
    unfused graph, so counting it rejected an exact fusion (a left-padded decoder batch: 5.3 at padding,
    1.4e-6 on the real tokens). Outputs without a [batch, sequence] layout are compared whole. Computed over
    blocks of real-token rows in one float32 buffer (the same differences and maximum, NaN included, as on the
    selected rows; no copies of a decoder's [tokens, 32k] logits: ~0.55 -> 0.1 s per check on the 45M Llama)."""
    if ref.shape != out.shape:
        raise ValueError(f"shapes differ: {ref.shape} vs {out.shape}")
    if mask is not None and ref.ndim >= 2 and ref.shape[:2] == mask.shape:
        rows = np.flatnonzero(mask.astype(bool).reshape(-1))
        width = int(np.prod(ref.shape[2:], dtype=np.int64))
    else:
        rows, width = None, int(ref.size)
    flat_ref, flat_out = ref.reshape(-1, max(width, 1)), out.reshape(-1, max(width, 1))
    count = len(rows) if rows is not None else len(flat_ref)
    if count == 0 or width == 0:
        return 0.0
    step = max(1, COSINE_BLOCK_ROWS * 4096 // width)
    buffer = np.empty((min(step, count), width), dtype=np.result_type(ref.dtype, out.dtype))
    maxima = []
    for start in range(0, count, step):
        block = slice(start, start + step) if rows is None else rows[start : start + step]
        r, o = flat_ref[block], flat_out[block]
        diff = buffer[: len(r)]
        np.subtract(r, o, out=diff)
        np.abs(diff, out=diff)
        maxima.append(diff.max())
    return float(np.max(maxima))


class Judge:
    """Mean token cosine of a candidate model vs the fp32 reference, on search or held-out samples."""

    def __init__(
        self, fp32: Path, data: CalibrationData, search_samples: int, reference: Reference | None
    ) -> None:
        self.data = data
        self.search_samples = search_samples
        ref_session = None if reference else _session(fp32, optimize=False, spin=False)
        self.reference = reference or (lambda feeds: _run(ref_session, feeds))
        self._refs: dict[str, list[np.ndarray]] = {}
        self._batches: dict[str, list[dict[str, np.ndarray]]] = {}
        self._norms: dict[str, list[np.ndarray]] = {}  # per batch: row_norms of its reference
        # references being made on another thread (`prepare_in`), per key: waited for on first use
        self._pending: dict[str, Future[str]] = {}
        self.last_heldout: dict[str, object] = {}  # how the last held-out judge read the split (EarlyStop)
        # the last session built, with what it was built from: the search's last candidate is the final
        # file, judged again on the held-out samples with the same options (one session, not two)
        self._last: tuple[tuple[Any, ...], onnx.ModelProto | Path, ort.InferenceSession] | None = None
        self.sessions_built = 0

    def search_cosine(self, model: onnx.ModelProto | Path, fake_quant: bool = False) -> float:
        return self._cosine(model, "calibration", self.search_samples, fake_quant)

    def heldout_cosine(
        self, model: onnx.ModelProto | Path, fake_quant: bool = False, target: float | None = None
    ) -> float:
        """Mean token cosine on the held-out samples; with a `target`, judged chunk by chunk until it is
        clear of the target (exporter/quantize/early_stop.py; `last_heldout` says how many were judged)."""
        return self._cosine(model, "heldout", None, fake_quant, target)

    def sweep(self, switchable: onnx.ModelProto, layers: list[str]) -> dict[str, float]:
        """Cosine on the search samples with each layer alone fake-quantized, from one switchable graph:
        `SWEEP_WORKERS` single-threaded sessions take the layers in turn, side by side (small runs use two
        cores better as two independent runs than as one run on two threads)."""
        self._referenced("calibration", self.search_samples)  # batches and references, once
        switchable = fold_weight_dequantize(switchable)  # the weights' round trips computed once: same bits
        sessions = [_session(switchable, optimize=False, threads=1) for _ in range(SWEEP_WORKERS)]
        bar = progress.bar(desc="sensitivity: layers alone", total=len(layers), unit="layer")

        def one(index: int) -> float:
            switch = np.zeros(len(layers), dtype=bool)
            switch[index] = True
            session = sessions[index % len(sessions)]
            cosine = self._mean_cosine(session, "calibration", self.search_samples, {SWITCH_INPUT: switch})
            bar.update(1)
            return cosine

        with bar, ThreadPoolExecutor(len(sessions)) as pool:
            # worker k only ever runs session k: layers k, k + workers, ... in order
            futures = [
                pool.submit(lambda k=k: [(i, one(i)) for i in range(k, len(layers), len(sessions))])
                for k in range(len(sessions))
            ]
            scores = dict(pair for future in futures for pair in future.result())
        return {name: scores[index] for index, name in enumerate(layers)}

    def switched_cosine(
        self, session: ort.InferenceSession, switch: dict[str, np.ndarray], samples: int | None = None
    ) -> float:
        """Cosine on the search samples (the first `samples` of them when given) of a switchable session
        (`switch`: its switch input's feed)."""
        return self._mean_cosine(session, "calibration", samples or self.search_samples, switch)

    def prepare_in(self, pool: ThreadPoolExecutor, split: str) -> None:
        """The fp32 references of `split`'s judged batches ("calibration": the search samples), made on `pool`'s
        thread beside this one's work; their first use waits for them (the same session, batches and
        references as made on first use: the same numbers)."""
        key = self._key(split, self._limit(split))
        if key not in self._refs and key not in self._pending:
            # held out: the first chunk only (a judge clear of its target stops there; the rest on demand)
            samples = early_stop.MIN_SAMPLES if split == "heldout" else None
            self._pending[key] = pool.submit(self._make_references, split, self._limit(split), samples)

    def _limit(self, split: str) -> int | None:
        return self.search_samples if split == "calibration" else None

    def max_abs_vs_reference(self, model: Path) -> float:
        """Max abs error of `model` (optimizations off) vs the fp32 references on the search samples' real
        tokens."""
        session = _session(model, optimize=False)
        pairs = self._pairs(session, "calibration", self.search_samples)
        return max(max_abs_on_real_tokens(ref, out, mask) for ref, out, mask in pairs)

    def _cosine(
        self,
        model: onnx.ModelProto | Path,
        split: str,
        limit: int | None,
        fake_quant: bool,
        target: float | None = None,
    ) -> float:
        # fake_quant: Q/DQ executed as written (optimizations off; the weights' DequantizeLinear computed
        # once, the same bits: exporter/quantize/fake_quant.py); else as ORT runs it (integer kernels)
        session = self._session(model, optimize=not fake_quant, fold=fake_quant)
        return self._mean_cosine(session, split, limit, target=target)

    def _mean_cosine(
        self,
        session: ort.InferenceSession,
        split: str,
        limit: int | None,
        extra: dict[str, np.ndarray] | None = None,
        target: float | None = None,
    ) -> float:
        """Mean token cosine of `session`'s outputs vs the references, over every judged token of the split
        (the references' row norms computed once per batch, however many candidates are judged). `target`
        (held-out split): stop at the first chunk boundary where the mean is clear of it (`EarlyStop`)."""
        key = self._batched(split, limit)
        groups = bool(self.data.groups.get(split))  # decode-step batches follow the prefills: judged whole
        early = target if split == "heldout" and not groups else None
        stop = EarlyStop(early, self.data.num_heldout if split == "heldout" else 0)
        for index, feeds in enumerate(self._batches[key]):
            ref, ref_norms = self._reference(key, index)
            mask = feeds.get("attention_mask")
            out = _run(session, {**feeds, **(extra or {})})
            rows = sample_of_rows(ref, mask) if early is not None else None  # only a stopping rule reads them
            stop.add(token_cosines(ref, out, mask, ref_norms), rows, ref.shape[0])
            if stop.done():
                break
        if split == "heldout":
            self.last_heldout = stop.to_json()
        return stop.mean()

    def _session(
        self, model: onnx.ModelProto | Path, optimize: bool, fold: bool = False
    ) -> ort.InferenceSession:
        """`_session(model, optimize)`, reusing the last one when it was built from the same graph object (the
        search's candidates are cached, never changed) or the same unchanged file, with the same options.
        `fold`: built from `fold_weight_dequantize(model)` (a fake-quant check: the same bits, faster)."""
        if isinstance(model, onnx.ModelProto):
            key: tuple[Any, ...] = ("graph", id(model), optimize, fold)  # valid: _last holds the graph alive
        else:
            stat = Path(model).stat()
            key = ("file", str(Path(model).resolve()), stat.st_size, stat.st_mtime_ns, optimize, fold)
        if self._last is not None and self._last[0] == key:
            return self._last[2]
        source = model
        if fold:
            source = fold_weight_dequantize(
                model if isinstance(model, onnx.ModelProto) else onnx.load(str(model))
            )
        session = _session(source, optimize)
        self.sessions_built += 1
        self._last = (key, model, session)
        return session

    def last_session(self) -> ort.InferenceSession | None:
        """The session of the last graph judged (the search's last candidate is the final file)."""
        return self._last[2] if self._last is not None else None

    def _referenced(self, split: str, limit: int | None) -> str:
        """The key of `split`'s first `limit` judged batches, their fp32 references and the references' row
        norms: made on first use, once (or waited for, where `prepare_in` is making them)."""
        key = self._batched(split, limit)
        self._make_references(split, limit)
        return key

    def _batched(self, split: str, limit: int | None) -> str:
        """The key of `split`'s judged batches, made (and any references `prepare_in` is making waited for)."""
        key = self._key(split, limit)
        pending = self._pending.pop(key, None)
        if pending is not None:
            pending.result()
        self._ensure_batches(key, split, limit)
        return key

    def _ensure_batches(self, key: str, split: str, limit: int | None) -> None:
        if key not in self._batches:
            chunk = early_stop.CHUNK if split == "heldout" else None  # a prefix of chunks: a random subset
            self._batches[key] = self.data.judge_batches(split, limit, JUDGE_BATCH, chunk)
            self._refs[key], self._norms[key] = [], []

    def _make_references(self, split: str, limit: int | None, samples: int | None = None) -> str:
        """The references of `split`'s judged batches holding its first `samples` samples (None: all)."""
        key = self._key(split, limit)
        self._ensure_batches(key, split, limit)
        covered = 0
        for index, feeds in enumerate(self._batches[key]):
            if samples is not None and covered >= samples:
                break
            self._reference(key, index)
            covered += len(next(iter(feeds.values())))
        return key

    def _reference(self, key: str, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Batch `index`'s fp32 reference and its row norms, made in order on first use."""
        refs, norms, batches = self._refs[key], self._norms[key], self._batches[key]
        while len(refs) <= index:
            feeds = batches[len(refs)]
            ref = np.asarray(self.reference(feeds))
            norms.append(row_norms(ref, feeds.get("attention_mask")))
            refs.append(ref)  # last: its length counts the batches referenced
        return refs[index], norms[index]

    @staticmethod
    def _key(split: str, limit: int | None) -> str:
        return f"{split}:{limit}"

    def _pairs(self, session, split, limit, extra=None):  # type: ignore[no-untyped-def]
        """(fp32 reference, output, mask) per batch: length-sorted batches cut to their real tokens
        (CalibrationData.judge_batches; every score here is over real tokens), built and referenced once."""
        key = self._referenced(split, limit)
        for feeds, ref in zip(self._batches[key], self._refs[key], strict=True):
            yield ref, _run(session, {**feeds, **(extra or {})}), feeds.get("attention_mask")


def sample_of_rows(reference: np.ndarray, attention_mask: np.ndarray | None) -> np.ndarray:
    """The batch row (sample) of each row `token_cosines` judges, in its order."""
    _, _, rows = _judged_rows(reference, reference, attention_mask)
    per_sample = max(reference.reshape(-1, reference.shape[-1]).shape[0] // max(reference.shape[0], 1), 1)
    return rows // per_sample


# Rows per block of `token_cosines`: selected rows are gathered a few MB at a time (in cache for the sums)
# instead of copying every real token's logits out first.
COSINE_BLOCK_ROWS = 64


def token_cosines(
    reference: np.ndarray,
    output: np.ndarray,
    attention_mask: np.ndarray | None,
    reference_norms: np.ndarray | None = None,
) -> np.ndarray:
    """Cosine per token (vectors on the last axis), over unmasked tokens when the mask matches [batch, seq].
    `reference_norms`: `row_norms(reference, attention_mask)`, when the caller judges several outputs against
    the same reference (the same numbers, computed once)."""
    ref, out, rows = _judged_rows(reference, output, attention_mask)
    norms = row_norms(reference, attention_mask) if reference_norms is None else reference_norms
    cosines = np.empty(len(rows), dtype=np.float64)
    for start in range(0, len(rows), COSINE_BLOCK_ROWS):
        block = rows[start : start + COSINE_BLOCK_ROWS]
        r, o = ref[block], out[block]
        # float64 sums without float64 copies of [tokens, vocab] logits (16x faster on a 32k vocabulary)
        dot = np.einsum("ij,ij->i", r, o, dtype=np.float64)
        denom = norms[start : start + len(block)] * np.sqrt(np.einsum("ij,ij->i", o, o, dtype=np.float64))
        cosines[start : start + len(block)] = np.where(denom > 0, dot / np.maximum(denom, 1e-30), 1.0)
    return cosines


def row_norms(reference: np.ndarray, attention_mask: np.ndarray | None) -> np.ndarray:
    """The float64 norm of each token row `token_cosines` judges, block by block as it sums them."""
    ref, _, rows = _judged_rows(reference, reference, attention_mask)
    norms = np.empty(len(rows), dtype=np.float64)
    for start in range(0, len(rows), COSINE_BLOCK_ROWS):
        r = ref[rows[start : start + COSINE_BLOCK_ROWS]]
        norms[start : start + len(r)] = np.sqrt(np.einsum("ij,ij->i", r, r, dtype=np.float64))
    return norms


def _judged_rows(
    reference: np.ndarray, output: np.ndarray, attention_mask: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """[-1, last axis] views of both, and the rows judged: the real tokens when the mask matches [batch, seq]."""
    ref = reference.reshape(-1, reference.shape[-1])
    out = output.reshape(-1, output.shape[-1])
    rows = np.arange(len(ref))
    if attention_mask is not None and reference.ndim == 3 and attention_mask.shape == reference.shape[:2]:
        rows = np.flatnonzero(attention_mask.reshape(-1))  # real tokens only, before any arithmetic
    return ref, out, rows


def _session(
    model: onnx.ModelProto | Path, optimize: bool, threads: int = 2, spin: bool = True
) -> ort.InferenceSession:
    """`spin=False`: the intra-op threads sleep between parallel sections instead of spinning, for a session
    that runs beside other work (the reference's beside the histograms: spinning threads take the core the
    histogram thread needs, and wait on each other when it has it)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    if not spin:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def _run(session: ort.InferenceSession, feeds: dict[str, np.ndarray]) -> np.ndarray:
    wanted = {i.name for i in session.get_inputs()}
    return session.run(None, {k: v for k, v in feeds.items() if k in wanted})[0]
