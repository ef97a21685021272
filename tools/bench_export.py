"""Benchmark (not a test): wall time of whole exports in this process, per stage, median of N runs.

Usage: python tools/bench_export.py [--runs 3] [--models demo llama] [--precision int8|fp32]
- demo: the demo MODEL_DIR (all-MiniLM-L6-v2 + masks + LoRA), the default export (INT8, every check, the
  stage table);
- llama: tools/bench_decoder.py's 45M-parameter Llama (hidden 512, 8 layers, GQA 8/2, vocab 32k, random
  init, no tokenizer: `--calibration random`), a KV-cache INT8 export.
Each MODEL_DIR is built once in a temporary folder; run it under `flock -x /tmp/cpu.lock`.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from exporter.api import export_engine
from exporter.config import ExportConfig
from exporter.testing.synthetic import write_minilm_demo_dir

ROOT = Path(__file__).resolve().parent.parent


def build(name: str, tmp: Path) -> tuple[Path, dict[str, object]]:
    """(MODEL_DIR, ExportConfig fields) of one benchmarked export."""
    if name == "demo":
        return write_minilm_demo_dir(tmp / "demo"), {}
    path = tmp / "llama45m"
    command = [sys.executable, str(ROOT / "tools" / "bench_decoder.py"), "--save-model", str(path)]
    subprocess.run(command, check=True, capture_output=True)
    return path, {"calibration": "random"}


def cpu_name() -> str:
    """lscpu's model name and whether the CPU has AMX (from /proc/cpuinfo; the platform's name elsewhere)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    model = next(
        (line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), ""
    )
    flags = next(
        (line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), []
    )
    return (model or platform.machine()) + (" (AMX)" if "amx_tile" in flags else "")


def openvino_line(report: dict[str, object]) -> str | None:
    """How the export's OpenVINO INT8 file was built: the recipe, NNCF's own time and what the export waited."""
    section = report.get("int8", {}).get("openvino") if isinstance(report.get("int8"), dict) else None  # type: ignore[union-attr]
    if not section or not section.get("file"):
        return None
    if section.get("recipe") != "nncf":
        return f"qdq ({section.get('why_not_nncf')})"
    waited = section.get("waited_s")
    beside = (
        f", CPU {section['process_cpu_s']:.1f} s in its process, waited {waited:.2f} s"
        if waited is not None
        else ""
    )
    return f"nncf {section['nncf_seconds']:.1f} s{beside}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--models", nargs="+", choices=["demo", "llama"], default=["demo", "llama"])
    parser.add_argument("--precision", choices=["int8", "fp32"], default="int8")
    args = parser.parse_args()
    print(f"{cpu_name()}, {os.cpu_count()} cores, median of {args.runs} runs")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            model_dir, fields = build(name, Path(tmp))
            totals, stages, openvino = [], {}, []
            for run in range(args.runs):
                config = ExportConfig(precision=args.precision, **fields)  # type: ignore[arg-type]
                start = time.perf_counter()
                result = export_engine(model_dir, Path(tmp) / f"{name}-out{run}", config)
                totals.append(time.perf_counter() - start)
                for stage, seconds in result.report["timings_s"].items():
                    stages.setdefault(stage, []).append(seconds)
                openvino.append(openvino_line(result.report))
            print(f"\n{name} export ({args.precision}): " + ", ".join(f"{t:.1f}" for t in totals) + " s")
            if any(openvino):
                print("model.int8.openvino.onnx: " + "; ".join(str(line) for line in openvino))
            print("| stage | median s |\n|---|---:|")
            for stage, values in stages.items():
                print(f"| {stage} | {statistics.median(values):.2f} |")
            print(f"| **total (wall, in-process)** | **{statistics.median(totals):.2f}** |")


if __name__ == "__main__":
    main()
