"""Benchmark (not a test): a Q/DQ file run as the INT8 checks run it (ONNX Runtime, optimizations off), as
written vs with its weights' DequantizeLinear folded (exporter/quantize/fake_quant.py), interleaved in one
process, median seconds per run; the outputs must be equal bit for bit.

Usage: python tools/bench_fake_quant.py OUT_DIR/model.int8.onnx [--batch 8] [--seq 128] [--rounds 5]
Random token ids (a decoder's empty past, or an encoder's mask of ones); run it under `flock -x /tmp/cpu.lock`.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import onnx
import onnxruntime as ort

from exporter.quantize.fake_quant import fold_weight_dequantize


def feeds_for(session: ort.InferenceSession, batch: int, seq: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    feeds: dict[str, np.ndarray] = {}
    for spec in session.get_inputs():
        if spec.name.startswith("past_key_values."):
            feeds[spec.name] = np.zeros((batch, spec.shape[1], 0, spec.shape[3]), np.float32)
        elif spec.name == "input_ids":
            feeds[spec.name] = rng.integers(0, 1000, (batch, seq)).astype(np.int64)
        elif spec.name == "position_ids":
            feeds[spec.name] = np.tile(np.arange(seq), (batch, 1)).astype(np.int64)
        elif spec.name == "token_type_ids":
            feeds[spec.name] = np.zeros((batch, seq), np.int64)
        else:
            feeds[spec.name] = np.ones((batch, seq), np.int64)
    return feeds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    model = onnx.load(args.model)
    sessions = {
        name: ort.InferenceSession(m.SerializeToString(), options, providers=["CPUExecutionProvider"])
        for name, m in (("as written", model), ("folded", fold_weight_dequantize(model)))
    }
    feeds = feeds_for(sessions["as written"], args.batch, args.seq)
    outputs = {name: s.run(None, feeds) for name, s in sessions.items()}  # warm-up, and the outputs compared
    same = all(a.tobytes() == b.tobytes() for a, b in zip(*outputs.values(), strict=True))
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for _ in range(args.rounds):
        for name, session in sessions.items():
            start = time.perf_counter()
            session.run(None, feeds)
            times[name].append(time.perf_counter() - start)
    for name, values in times.items():
        print(f"{name:10s} {statistics.median(values):.3f} s per run (batch {args.batch} x {args.seq})")
    print("outputs equal bit for bit" if same else "OUTPUTS DIFFER")


if __name__ == "__main__":
    main()
