"""The stage-by-stage table of an export: parameters, file size, latency and accuracy of every stage
(PyTorch masked+merged reference, compact fp32 ONNX, optimized graph, INT8), side by side.

Why one function times all stages: single latencies on a shared machine drift by tens of percent
from minute to minute, but stages timed round-robin in one process (engines.benchmark) see the same
noise, so the *ratios* between stages hold. Accuracy is measured on the same feeds against the
reference outputs: max abs error over every output both sides have, and the mean cosine over rows
(tokens) of the primary output's last axis, the statistic INT8 is judged by (exporter/validate/tolerances.py).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from engines import benchmark, stats
from engines.base import Runner
from engines.benchmark import BenchConfig, Variant
from exporter import progress

REPORT_CONFIG = BenchConfig(warmup_ms=200.0, iterations=20, duration_s=2.0, avg_runs=10, percentiles=(90.0,))
COLUMNS = ("stage", "params", "file size", "latency median", "p90", "cosine", "max abs err")
# columns shown only when some stage has a value: the task's agreement, labeled accuracy and F1
TASK_COLUMNS = (("agreement", "task agreement"), ("accuracy", "accuracy"), ("f1", "F1"))


@dataclasses.dataclass(frozen=True)
class StageResult:
    """One row of the stage table; `None` where a value does not apply (no file, no reference)."""

    name: str
    path: Path | None
    params: int
    file_bytes: int | None
    latency_median_ms: float
    latency_p90_ms: float
    cosine: float | None
    max_abs_err: float | None
    note: str = ""
    agreement: float | None = None  # the task's agreement with the reference (exporter/tasks/metrics.py)
    accuracy: float | None = None  # labeled accuracy on --eval-data
    f1: float | None = None  # labeled macro-F1 (QA: SQuAD token F1) on --eval-data


@dataclasses.dataclass(frozen=True)
class StageInfo:
    """What a runner cannot tell about its stage: its file, its parameter count (else counted), a note."""

    path: Path | None = None
    params: int | None = None
    note: str = ""


def count_onnx_params(path: str | Path) -> int:
    """Elements of every initializer (weights, biases, Q/DQ scales); the same count for fp32 and int8."""
    model = onnx.load(str(path), load_external_data=False)
    return sum(math.prod(t.dims) for t in model.graph.initializer)


def onnx_file_bytes(path: str | Path) -> int:
    """The .onnx file plus any external-data files its initializers point to."""
    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)
    locations = {
        entry.value
        for t in model.graph.initializer
        if t.data_location == onnx.TensorProto.EXTERNAL
        for entry in t.external_data
        if entry.key == "location"
    }
    return path.stat().st_size + sum((path.parent / loc).stat().st_size for loc in locations)


def mean_row_cosine(got: np.ndarray, want: np.ndarray) -> float:
    """Mean over rows (all axes but the last, e.g. tokens) of the cosine along the last axis; two all-zero
    rows count as identical (1), one zero row against a non-zero one as 0."""
    a = got.reshape(-1, got.shape[-1]).astype(np.float64)
    b = want.reshape(-1, want.shape[-1]).astype(np.float64)
    norm_a, norm_b = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    cos = np.sum(a * b, axis=1) / np.maximum(norm_a * norm_b, 1e-30)
    both_zero = (norm_a == 0) & (norm_b == 0)  # e.g. masked tokens zeroed on both sides: identical rows
    return float(np.mean(np.where(both_zero, 1.0, cos)))


def accuracy(
    outputs: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray], primary: str | None = None
) -> tuple[float | None, float | None]:
    """(mean row cosine of the primary output, max abs error over shared outputs); None if none shared."""
    shared = [name for name in reference if name in outputs]
    if not shared:
        return None, None
    for name in shared:
        if outputs[name].shape != reference[name].shape:
            raise ValueError(
                f"output {name!r}: shape {outputs[name].shape} vs reference {reference[name].shape}"
            )
    primary = primary if primary in shared else shared[0]
    max_abs = max(float(np.max(np.abs(outputs[n].astype(np.float64) - reference[n]))) for n in shared)
    return mean_row_cosine(outputs[primary], reference[primary]), max_abs


def _params_of(runner: Runner, info: StageInfo) -> int:
    if info.params is not None:
        return info.params
    module = getattr(runner, "module", None)
    if module is not None:
        return sum(p.numel() for p in module.parameters())
    path = info.path or getattr(runner, "path", None)
    if path is not None and Path(path).suffix == ".onnx":
        return count_onnx_params(path)
    raise ValueError(f"cannot count the parameters of a {type(runner).__name__}; pass StageInfo(params=...)")


def _file_bytes(runner: Runner, info: StageInfo) -> tuple[Path | None, int | None]:
    path = info.path or getattr(runner, "path", None)
    if path is None:
        return None, None
    path = Path(path)
    return path, onnx_file_bytes(path) if path.suffix == ".onnx" else path.stat().st_size


def measure_stages(
    stages: Sequence[tuple[str, Runner]],
    feeds: Mapping[str, np.ndarray],
    reference_outputs: Mapping[str, np.ndarray],
    *,
    info: Mapping[str, StageInfo] | None = None,
    config: BenchConfig = REPORT_CONFIG,
    primary_output: str | None = None,
) -> list[StageResult]:
    """Accuracy of each (active) runner on `feeds` vs `reference_outputs`, then all timed round-robin."""
    info = info or {}
    accuracies = [accuracy(runner.infer(feeds), reference_outputs, primary_output) for _, runner in stages]
    with progress.bar(desc="timing stages", total=100, unit="%") as bar:
        results = benchmark.run_interleaved(
            [Variant(name, runner, feeds) for name, runner in stages],
            config,
            lambda done: bar.update(round(100 * done) - bar.n),
        )
    rows = []
    for (name, runner), (cosine, max_abs), timed in zip(stages, accuracies, results):
        stage_info = info.get(name, StageInfo())
        path, size = _file_bytes(runner, stage_info)
        latencies = sorted(it.latency_ms for it in timed.iterations)
        rows.append(
            StageResult(
                name=name,
                path=path,
                params=_params_of(runner, stage_info),
                file_bytes=size,
                latency_median_ms=stats.median(latencies),
                latency_p90_ms=stats.percentile(latencies, 90.0),
                cosine=cosine,
                max_abs_err=max_abs,
                note=stage_info.note,
            )
        )
    return rows


# ---------------------------------------------------------------- rendering


def _ratio(value: float | None, first: float | None) -> str:
    return f" ({value / first:.2f}×)" if value is not None and first else ""


def _row(stage: StageResult, first: StageResult) -> list[str]:
    size = "—" if stage.file_bytes is None else f"{stage.file_bytes / 2**20:.1f} MiB"
    return [
        stage.name,
        f"{stage.params / 1e6:.2f} M{_ratio(stage.params, first.params)}",
        size + ("" if stage.file_bytes is None else _ratio(stage.file_bytes, first.file_bytes)),
        f"{stage.latency_median_ms:.2f} ms{_ratio(stage.latency_median_ms, first.latency_median_ms)}",
        f"{stage.latency_p90_ms:.2f} ms",
        "—" if stage.cosine is None else f"{stage.cosine:.5f}",
        "—" if stage.max_abs_err is None else f"{stage.max_abs_err:.2e}",
    ]


def _task_columns(stages: Sequence[StageResult]) -> list[tuple[str, str]]:
    return [
        (field, title) for field, title in TASK_COLUMNS if any(getattr(s, field) is not None for s in stages)
    ]


def render_markdown(stages: Sequence[StageResult]) -> str:
    """The stage table (ratios in parentheses are to the first stage), then one line per stage note."""
    if not stages:
        return ""
    extra = _task_columns(stages)
    columns = [*COLUMNS, *(title for _, title in extra)]
    lines = ["| " + " | ".join(columns) + " |", "|---|" + "---:|" * (len(columns) - 1)]
    for stage in stages:
        values = [getattr(stage, field) for field, _ in extra]
        cells = ["—" if v is None else f"{v:.4f}" for v in values]
        lines.append("| " + " | ".join([*_row(stage, stages[0]), *cells]) + " |")
    notes = [f"- {stage.name}: {stage.note}" for stage in stages if stage.note]
    return "\n".join(lines + (["", *notes] if notes else [])) + "\n"


def to_json(stages: Sequence[StageResult]) -> dict[str, Any]:
    """report.json's `stages` section: every field, plus ratios to the first stage."""
    first = stages[0] if stages else None
    rows = []
    for stage in stages:
        row = dataclasses.asdict(stage) | {"path": None if stage.path is None else str(stage.path)}
        if first is not None:
            row["latency_ratio_to_first"] = stage.latency_median_ms / first.latency_median_ms
            row["params_ratio_to_first"] = stage.params / first.params if first.params else None
        rows.append(row)
    return {"reference_stage": first.name if first else None, "stages": rows}


def write_chart(stages: Sequence[StageResult], png_path: str | Path) -> Path:
    """Two panels, latency (median bar, p90 tick) and file size per stage, as a PNG (Agg, no display); a
    third with the labeled accuracy (and F1) per stage when the export had --eval-data."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = [stage.name for stage in stages]
    x = np.arange(len(stages))
    labeled = any(s.accuracy is not None for s in stages)
    width = max(6.0, 1.8 * len(stages) + 2) * (1.5 if labeled else 1.0)
    fig = Figure(figsize=(width, 4.0), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 3 if labeled else 2)
    lat_ax, size_ax = axes[0], axes[1]
    medians = [s.latency_median_ms for s in stages]
    bars = lat_ax.bar(x, medians, color="tab:blue", label="median")
    lat_ax.bar_label(bars, fmt="%.1f", padding=2, fontsize=8)
    lat_ax.scatter(
        x, [s.latency_p90_ms for s in stages], marker="_", s=400, color="black", label="p90", zorder=3
    )
    lat_ax.set(title="Latency per stage", ylabel="ms")
    lat_ax.legend(loc="upper right")
    sizes = [0.0 if s.file_bytes is None else s.file_bytes / 2**20 for s in stages]
    size_bars = size_ax.bar(x, sizes, color="tab:orange")
    size_ax.bar_label(
        size_bars,
        labels=["" if s.file_bytes is None else f"{v:.1f}" for s, v in zip(stages, sizes)],
        padding=2,
        fontsize=8,
    )
    for i, stage in enumerate(stages):
        if stage.file_bytes is None:
            size_ax.annotate("no file", (i, 0), ha="center", va="bottom")
    size_ax.set(title="File size per stage", ylabel="MiB")
    if labeled:
        _accuracy_panel(axes[2], stages, x)
    for ax in axes:
        ax.set_xticks(x, names, rotation=20, ha="right")
    png_path = Path(png_path)
    fig.savefig(png_path, format="png", dpi=110)
    return png_path


def _accuracy_panel(ax: Any, stages: Sequence[StageResult], x: np.ndarray) -> None:
    """Labeled accuracy (bars) and F1 (ticks) per stage, on --eval-data."""
    accuracy = [0.0 if s.accuracy is None else s.accuracy for s in stages]
    bars = ax.bar(x, accuracy, color="tab:green", label="accuracy")
    ax.bar_label(bars, fmt="%.3f", padding=2, fontsize=8)
    f1 = [np.nan if s.f1 is None else s.f1 for s in stages]
    ax.scatter(x, f1, marker="_", s=400, color="black", label="F1", zorder=3)
    low = min([v for v in accuracy + f1 if v == v] or [0.0])
    ax.set(title="Labeled accuracy per stage", ylim=(max(0.0, low - 0.1), 1.02))
    ax.legend(loc="lower right")
