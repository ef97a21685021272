"""Benchmark (not a test): the CPU INT8 file's child build, ONNX Runtime's per-channel weight loop against
exporter/quantize/per_channel_weights.py's vectorized copy, alone and with exporter/quantize/ort_shape_inference.py's
in-memory shape inference (the child as BackgroundBuild runs it), runs interleaved, medians of wall and CPU time.

Usage: python tools/bench_cpu_int8_child.py MODEL_ONNX [--runs 5] [--strip-metadata sparsity_2to4]
MODEL_ONNX: e.g. the model.onnx of a Llama export (the file the export's background build quantizes).
Each run is a fresh interpreter started as `BackgroundBuild` starts it (same malloc settings, no exclusions,
8-bit weights); the variants' files must be byte-identical. Run it under `flock -x /tmp/cpu.lock`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from exporter.quantize.cpu_int8 import child_environment  # noqa: E402

CODE = (
    "import json, sys; sys.path.insert(0, sys.argv[2]); from pathlib import Path; {install}"
    "from exporter.quantize.cpu_int8 import build; a = json.loads(sys.argv[1]); "
    "build(Path(a[0]), Path(a[1]), frozenset(a[2]), a[3], a[4])"
)
VECTORIZED = "from exporter.quantize import per_channel_weights as w; assert w.install(); "
VARIANTS = {
    "onnxruntime loop": CODE.format(install=""),
    "vectorized": CODE.format(install=VECTORIZED),
    "vectorized + shapes in memory": CODE.format(  # what BackgroundBuild's child runs
        install=VECTORIZED + "from exporter.quantize import ort_shape_inference as s; assert s.install(); "
    ),
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model", type=Path)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--strip-metadata", default="sparsity_2to4")
    args = parser.parse_args()
    print(f"CPU: {platform.processor() or platform.machine()}")
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in VARIANTS}
    digests: set[str] = set()
    with tempfile.TemporaryDirectory() as tmp:
        for run in range(args.runs):
            order = list(VARIANTS.items())
            for name, code in order if run % 2 == 0 else order[::-1]:
                out = Path(tmp) / f"{len(times[name])}.onnx"
                build_args = json.dumps([str(args.model), str(out), [], False, args.strip_metadata])
                before = resource.getrusage(resource.RUSAGE_CHILDREN)
                start = time.perf_counter()
                subprocess.run(
                    [sys.executable, "-c", code, build_args, str(ROOT)],
                    check=True,
                    env=child_environment(),
                    stderr=subprocess.DEVNULL,
                )
                wall = time.perf_counter() - start
                after = resource.getrusage(resource.RUSAGE_CHILDREN)
                cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
                times[name].append((wall, cpu))
                digests.add(hashlib.sha256(out.read_bytes()).hexdigest())
                print(f"{name}: wall {wall:.2f} s, CPU {cpu:.2f} s", flush=True)
    for name, runs in times.items():
        wall = statistics.median(w for w, _ in runs)
        cpu = statistics.median(c for _, c in runs)
        print(f"{name}: median wall {wall:.2f} s, median CPU {cpu:.2f} s over {len(runs)} runs")
    print("files byte-identical:", len(digests) == 1)
    if len(digests) != 1:
        sys.exit(1)


if __name__ == "__main__":
    main()
