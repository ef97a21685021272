"""The INT4 export's prefill/decode pair, run: its prefill speed against the decode file's, and its gate.

The pair (exporter/quantize/int4_pair.py writes the prompt file): the prompt on a dynamic INT8 file, every
later step on the INT4 file, one cache (`CachedDecoder(decode, prefill=...)`). The export keeps it where
`time_prefills` says the INT8 file's prefill is faster on the export's own prompt (interleaved rounds,
medians: a decision, not a benchmark) and `judge_pair` passes: the pair's generation vs the fp32 file at the
INT4 greedy-agreement bar, teacher-forced as the pair runs (greedy_agreement with a `(decode, prefill)` pair).
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

from exporter.runtime.generation import CachedDecoder, greedy_agreement

TIMING_ROUNDS = 5


def _session(path: Path, threads: int) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def time_prefills(
    prefill: Path, decode: Path, prompt: np.ndarray, threads: int, rounds: int = TIMING_ROUNDS
) -> dict[str, float]:
    """Median ms of one prefill of `prompt` (1 x tokens, empty cache) on each file, rounds interleaved."""
    decoders = {
        "prefill_file_ms": CachedDecoder(_session(prefill, threads)),
        "decode_file_ms": CachedDecoder(_session(decode, threads)),
    }
    times: dict[str, list[float]] = {name: [] for name in decoders}
    for i in range(rounds + 1):  # round 0 warms up
        for name in decoders if i % 2 else reversed(list(decoders)):
            decoders[name].reset(prompt.shape[0])
            start = time.perf_counter()
            decoders[name].forward(prompt)
            if i:
                times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


def judge_pair(
    fp32: Path,
    prefill: Path,
    decode: Path,
    prompts: list[np.ndarray],
    min_agreement: float,
    new_tokens: int = 16,
) -> dict[str, Any]:
    """Greedy agreement and logit cosine of the pair's generation (prompt on `prefill`, steps on `decode`) vs
    the fp32 file, as ONNX Runtime runs them (exporter.runtime.generation.greedy_agreement)."""
    reference = _session(fp32, 1)
    pair = (_session(decode, 1), _session(prefill, 1))
    quality = greedy_agreement(reference, pair, prompts, max_new_tokens=new_tokens)
    return {
        **quality,
        "min_greedy_agreement": min_agreement,
        "passed": quality["greedy_agreement"] >= min_agreement,
        "quality_vs": f"fp32 {fp32.name}: the prompt on {prefill.name}, every new token on {decode.name}",
    }
