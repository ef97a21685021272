"""Which engine serves an export: the one decision, kept small so other engines can join it.

The export records its choice in report.json (`engine`): the TensorRT plan where one was built and
TensorRT runs here; else the CPU engine chosen by measurement (`engine.cpu`: runtime, file and precision,
engines/cpu_selection.py), opened exactly as it was timed. An export from before `engine.cpu` was recorded
serves its CPU INT8 file on ONNX Runtime when present, else `model.onnx`. `file=` overrides the choice.

A KV-cache decoder exported with `--precision int4` may record a prefill/decode pair
(`deployment.decoder_pair`: `prefill` runs the prompt, `decode` every later step; exporter/quantize/int4_pair.py):
when the chosen CPU engine serves the pair's decode file, `Serving.prefill` is the prefill file, run on
ONNX Runtime beside it (exporter.runtime.generation.CachedDecoder(decode, prefill=...)). `file=` serves that
one file alone.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from engines.selection import tensorrt_skip_reason
from export_errors import InputError

PLAN_FILE = "model.plan"
CPU_INT8_FILE = "model.int8.cpu.onnx"
FP32_FILE = "model.onnx"


@dataclasses.dataclass(frozen=True)
class Serving:
    """The file that serves, on which runtime ("auto": by its suffix) and, for OpenVINO, at which precision."""

    path: Path
    backend: str = "auto"
    precision: str | None = None
    threads: int | None = None
    prefill: Path | None = None  # the pair's prompt file (ONNX Runtime), where the export recorded one


def serving_engine(out_dir: Path, report: dict[str, Any], file: str | None = None) -> Serving:
    """The engine the export chose for this machine, or `file` of the export (see the module docstring)."""
    if file is not None:
        return Serving(_existing(out_dir / file, "no such file in the export"))
    engine = report.get("engine", {})
    plan = out_dir / PLAN_FILE
    if engine.get("tensorrt_build") and plan.is_file() and tensorrt_skip_reason() is None:
        return Serving(plan)
    cpu = engine.get("cpu")
    if isinstance(cpu, dict) and cpu.get("file"):
        openvino = cpu.get("engine") == "openvino"
        pair = decoder_pair(report)
        prefill = None
        if pair is not None and pair.get("decode") == cpu["file"] and cpu.get("engine") == "onnxruntime":
            prefill = _existing(out_dir / pair["prefill"], "the prefill file report.json pairs is missing")
        return Serving(
            _existing(out_dir / cpu["file"], "the file report.json names to serve the export is missing"),
            backend=str(cpu.get("engine", "auto")),
            precision=cpu.get("engine_precision") if openvino else None,
            threads=cpu.get("threads"),
            prefill=prefill,
        )
    name = CPU_INT8_FILE if (out_dir / CPU_INT8_FILE).is_file() else FP32_FILE
    return Serving(_existing(out_dir / name, "the file report.json names to serve the export is missing"))


def decoder_pair(report: dict[str, Any]) -> dict[str, str] | None:
    """report.json's prefill/decode pair ({"prefill": file, "decode": file}), None where none was kept."""
    pair = report.get("deployment", {}).get("decoder_pair")
    return pair if isinstance(pair, dict) and pair.get("prefill") and pair.get("decode") else None


def _existing(path: Path, problem: str) -> Path:
    if not path.is_file():
        raise InputError(path, problem)
    return path
