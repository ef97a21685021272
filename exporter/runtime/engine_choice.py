"""Which file of an export serves it: the one decision, kept small so other engines can join it.

The export records its choice in report.json (`engine`): the TensorRT plan where one was built and
TensorRT runs here, else the CPU file it names (`engine.cpu_file`: the CPU INT8 file when there is one,
else the optimized fp32 `model.onnx`). An export from before `cpu_file` was recorded serves its CPU INT8
file when present, else `model.onnx`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from engines.selection import tensorrt_skip_reason
from export_errors import InputError

PLAN_FILE = "model.plan"
CPU_INT8_FILE = "model.int8.cpu.onnx"
FP32_FILE = "model.onnx"


def serving_file(out_dir: Path, report: dict[str, Any]) -> Path:
    """The engine file the export chose for this machine (see the module docstring)."""
    engine = report.get("engine", {})
    plan = out_dir / PLAN_FILE
    if engine.get("tensorrt_build") and plan.is_file() and tensorrt_skip_reason() is None:
        return plan
    name = engine.get("cpu_file") or (CPU_INT8_FILE if (out_dir / CPU_INT8_FILE).is_file() else FP32_FILE)
    path = out_dir / name
    if not path.is_file():
        raise InputError(path, "the file report.json names to serve the export is missing")
    return path
