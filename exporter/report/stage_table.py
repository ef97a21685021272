"""The export's stage table: every stage side by side, timed interleaved in one process.

Latency: median and p90 at batch 1 x the validation sequence length, all stages round-robin (so the
ratios hold on a noisy machine), rounds until each row's median is known within ±3% (at most
`ExportConfig.benchmark_iterations`) so the table costs the export little time. Accuracy: taken from the export's own validation section (all
validation samples, real tokens for INT8), so the table and the gates agree by construction.

The CPU engine's candidates that are not already a stage (OpenVINO on its files, engines/cpu_selection.py)
join the same round-robin as extra rows (`ExtraStage`): their latencies are the ones the choice is made on,
measured once, beside the stages.
The task's agreement with the reference (labels, spans, tokens picked) and, with `--eval-data`, the
labeled accuracy and F1 of every stage come from the export's checks the same way.
"""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from engines.base import Runner, open_together
from engines.onnxruntime_runner import OnnxRuntimeRunner
from engines.torch_runner import TorchRunner
from exporter.report import stage_report
from exporter.report.stage_report import StageInfo, StageResult

# stage name -> (artifact key, validation check, note)
STAGES: tuple[tuple[str, str, str | None, str], ...] = (
    ("pytorch masked+merged", "", None, "the reference: PyTorch eager, fp32, masks applied, LoRA merged"),
    ("onnx fp32 compact", "exported", "onnx_fp32", "restructured (dead units removed), as exported"),
    ("onnx fp32 optimized", "onnx", "optimized_fp32", "after the graph passes (model.onnx)"),
    (
        "int8 Q/DQ (TensorRT)",
        "int8",
        "int8_tensorrt",
        "for TensorRT; on ORT CPU its Q/DQ run as fake quantization",
    ),
    ("int8 CPU", "int8_cpu", "int8_cpu", "for ONNX Runtime CPU: integer kernels (the CPU engine's model)"),
)


# Warm-up per row, then interleaved rounds (no minimum duration): at least MIN_ROUNDS, then each row until
# its median is known within ±MEDIAN_REL_CI (~95% interval, engines/stats.py median_ci), at most
# `benchmark_iterations` rounds. A fixed 30 rounds spent most of the stage on the slow PyTorch row.
WARMUP_MS = 50.0  # each row has run once already (its accuracy); the interval rule guards the rest
MIN_ROUNDS = 10
MEDIAN_REL_CI = 0.03


def rounds_rule(iterations: int) -> str:
    """The report's words for how many rounds each row was timed."""
    low = min(MIN_ROUNDS, iterations)
    return f"{low} to {iterations} rounds (each row until its median is within ±{MEDIAN_REL_CI:.0%}, ~95% interval)"


@dataclasses.dataclass(frozen=True)
class ExtraStage:
    """A row beside the stages: an active runner (opened by the caller), its info and its validation key."""

    name: str
    runner: Runner
    info: StageInfo
    check: str


def measure(
    reference_wrapper: nn.Module,
    output_names: list[str],
    artifacts: dict[str, Path],
    feeds: dict[str, np.ndarray],
    validation: dict[str, list[dict[str, Any]]],
    threads: int,
    iterations: int,
    extra: list[ExtraStage] | None = None,
    agreement: dict[str, dict[str, Any]] | None = None,
    labeled: dict[str, dict[str, Any]] | None = None,
) -> list[StageResult]:
    """Time every available stage (and the `extra` rows) on one sample of `feeds`; accuracy from
    `validation`, the task's agreement from `agreement` and labeled scores from `labeled` (both keyed by
    check; "reference" is the PyTorch stage's labeled score)."""
    timing_feeds = {name: array[:1] for name, array in feeds.items()}
    config = dataclasses.replace(
        stage_report.REPORT_CONFIG,
        warmup_ms=WARMUP_MS,
        iterations=min(MIN_ROUNDS, iterations),
        duration_s=0.0,
        median_rel_ci=MEDIAN_REL_CI,
        max_iterations=iterations,
    )
    checks = {name: check for name, _, check, _ in STAGES} | {e.name: e.check for e in extra or []}
    with contextlib.ExitStack() as stack:
        runners: list[tuple[str, Any]] = []
        info: dict[str, StageInfo] = {}
        for name, key, _, note in STAGES:
            if key and key not in artifacts:
                continue
            if key:
                runner: Runner = OnnxRuntimeRunner(artifacts[key], threads=threads, spinning=False)
            else:
                runner = TorchRunner(reference_wrapper, list(feeds), output_names, threads=threads)
            runners.append((name, runner))
            info[name] = StageInfo(path=artifacts.get(key), note=note)
        # sessions built two at a time (engines.base.open_together); all built before anything is timed
        error = next((e for e in open_together([r for _, r in runners], stack) if e is not None), None)
        if error is not None:
            raise error
        for row in extra or []:
            runners.append((row.name, row.runner))
            info[row.name] = row.info
        reference = runners[0][1].infer(timing_feeds)
        rows = stage_report.measure_stages(runners, timing_feeds, reference, info=info, config=config)
    return [
        _with_task_scores(
            _with_validation(row, validation, checks.get(row.name)), checks.get(row.name), agreement, labeled
        )
        for row in rows
    ]


def _with_task_scores(
    row: StageResult,
    check: str | None,
    agreement: dict[str, dict[str, Any]] | None,
    labeled: dict[str, dict[str, Any]] | None,
) -> StageResult:
    task_agreement = None
    if agreement:
        task_agreement = 1.0 if check is None else agreement.get(check, {}).get("agreement")
    scores = (labeled or {}).get(check or "reference", {})
    return dataclasses.replace(
        row, agreement=task_agreement, accuracy=scores.get("accuracy"), f1=scores.get("f1")
    )


def _with_validation(
    row: StageResult, validation: dict[str, list[dict[str, Any]]], check: str | None
) -> StageResult:
    if check is None:
        return dataclasses.replace(row, cosine=1.0, max_abs_err=0.0)
    comparisons = validation.get(check, [])
    if not comparisons:
        return row
    return dataclasses.replace(
        row,
        cosine=comparisons[0]["mean_cosine"],
        max_abs_err=max(c["max_abs"] for c in comparisons),
    )
