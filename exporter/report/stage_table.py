"""The export's stage table: every stage side by side, timed interleaved in one process.

Latency: median and p90 at batch 1 x the validation sequence length, all stages round-robin (so the
ratios hold on a noisy machine). Accuracy: taken from the export's own validation section (all
validation samples, real tokens for INT8), so the table and the gates agree by construction.
"""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

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


def measure(
    reference_wrapper: nn.Module,
    output_names: list[str],
    artifacts: dict[str, Path],
    feeds: dict[str, np.ndarray],
    validation: dict[str, list[dict[str, Any]]],
    threads: int,
    iterations: int,
) -> list[StageResult]:
    """Time every available stage on one sample of `feeds`; accuracy from `validation`."""
    timing_feeds = {name: array[:1] for name, array in feeds.items()}
    config = dataclasses.replace(stage_report.REPORT_CONFIG, iterations=iterations)
    with contextlib.ExitStack() as stack:
        runners: list[tuple[str, Any]] = []
        info: dict[str, StageInfo] = {}
        for name, key, _, note in STAGES:
            if key and key not in artifacts:
                continue
            if key:
                runner = OnnxRuntimeRunner(artifacts[key], threads=threads, spinning=False)
            else:
                runner = TorchRunner(reference_wrapper, list(feeds), output_names, threads=threads)
            runners.append((name, stack.enter_context(runner)))
            info[name] = StageInfo(path=artifacts.get(key), note=note)
        reference = runners[0][1].infer(timing_feeds)
        rows = stage_report.measure_stages(runners, timing_feeds, reference, info=info, config=config)
    return [_with_validation(row, validation) for row in rows]


def _with_validation(row: StageResult, validation: dict[str, list[dict[str, Any]]]) -> StageResult:
    check = next((c for name, _, c, _ in STAGES if name == row.name), None)
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
