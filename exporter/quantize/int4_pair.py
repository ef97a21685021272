"""The prefill/decode pair of an INT4 decoder export: the prompt on a dynamic INT8 file, every step on INT4.

Why: weight-only INT4 (MatMulNBits) is fastest per token, where the weight bytes read bound the time, but on
a whole prompt the time is arithmetic, and ONNX Runtime's dynamic INT8 kernels (u8 x s8, VNNI/AMX) win it:
measured with tools/bench_decoder.py --peers (README "INT4"), prefill 7714 tok/s for the INT8 file vs 2793
for the INT4 one, on one Sapphire Rapids; 5952 vs 2691 on a Zen 4. Both files read and write the same cache
(`past_key_values.*`, same KV heads and head sizes), so `exporter.runtime.generation.CachedDecoder(decode,
prefill=...)` runs the prompt on one and every later step on the other.

Here: the prefill file (`build_prefill_file`: ONNX Runtime's dynamic quantization of the optimized fp32
`model.onnx`, per-channel s8 weights, as tools/bench_decoder.py's INT8 row). Its timing against the INT4
file and the pair's gate run the files (exporter/runtime/decoder_pair.py); the API decides and records.
"""

from __future__ import annotations

from pathlib import Path

from exporter.quantize.cpu_features import reduce_weight_range
from exporter.quantize.cpu_int8 import build

PREFILL_FILE = "model.int8.cpu.onnx"


def build_prefill_file(optimized_fp32: Path, work: Path, weight_range: str = "auto") -> tuple[Path, str]:
    """`model.int8.cpu.onnx`: dynamic INT8 of the optimized fp32 decoder; (path, why this weight range)."""
    reduce_range, why = reduce_weight_range(weight_range)  # type: ignore[arg-type]
    return build(optimized_fp32, work / PREFILL_FILE, frozenset(), reduce_range), why
