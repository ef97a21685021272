"""Benchmark (not a test): wall time of the whole export of the demo model, per stage, median of N runs.

Usage: python tools/bench_export.py [--runs 3] [--precision int8|fp32]
Builds the demo MODEL_DIR (all-MiniLM-L6-v2 + masks + LoRA) once in a temporary folder.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from exporter.api import export_engine
from exporter.config import ExportConfig
from exporter.testing.synthetic import write_minilm_demo_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--precision", choices=["int8", "fp32"], default="int8")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = write_minilm_demo_dir(Path(tmp) / "demo")
        totals, stages = [], {}
        for run in range(args.runs):
            start = time.perf_counter()
            result = export_engine(model_dir, Path(tmp) / f"out{run}", ExportConfig(precision=args.precision))
            totals.append(time.perf_counter() - start)
            for name, seconds in result.report["timings_s"].items():
                stages.setdefault(name, []).append(seconds)
    print(f"demo export ({args.precision}), median of {args.runs} runs, {os.cpu_count()} cores")
    print("| stage | median s |\n|---|---|")
    for name, values in stages.items():
        print(f"| {name} | {statistics.median(values):.2f} |")
    print(f"| **total** | **{statistics.median(totals):.2f}** |")


if __name__ == "__main__":
    main()
