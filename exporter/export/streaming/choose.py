"""When the API takes the streaming path: `--streaming on|off|auto`, auto by the model's fp32 weight bytes.

The whole-model path peaks at ~2.65x the fp32 weight bytes (README, tools/bench_large_model.py); the
streaming path holds about one decoder layer, the embedding table and ONNX Runtime's checks. Below the
threshold the whole-model path is kept (it is the one every other stage was developed on, and small models
fit); above it, on a 24 GiB machine, the whole path would not fit (4 GiB fp32 x 2.65 = 10.6 GiB).
"""

from __future__ import annotations

from pathlib import Path

from export_errors import InputError
from exporter.model_dir.lazy_weights import read_lazy_weights

GIB = 1024**3
THRESHOLD_BYTES = 4 * GIB


def fp32_weight_bytes(model_dir: Path) -> int:
    """The checkpoint's weights at 4 bytes per value (from the safetensors headers: nothing is read)."""
    tensors, _ = read_lazy_weights(model_dir)
    return sum(int(t.shape.numel()) * 4 for t in tensors.values())


def small_for_auto(mode: str, model_dir: Path) -> bool:
    """`auto` on a model at or under THRESHOLD_BYTES: the whole-model path, decided from the safetensors
    headers alone (before anything loads the folder)."""
    return mode == "auto" and fp32_weight_bytes(model_dir) <= THRESHOLD_BYTES


def use_streaming(mode: str, with_past: bool, model_dir: Path, task: str) -> bool:
    """Whether to stream: `on` (only KV-cache decoders can), `off`, or `auto` (above THRESHOLD_BYTES)."""
    if mode == "off":
        return False
    if not with_past:
        if mode == "on":
            raise InputError(
                "--streaming",
                f"on: only KV-cache decoders (text-generation-with-past) stream; the task is {task}",
            )
        return False
    if mode == "on":
        return True
    return fp32_weight_bytes(model_dir) > THRESHOLD_BYTES


# A streamed model up to this many fp32 bytes is also checked as whole files on ONNX Runtime (the export,
# the optimized graph) and its CPU engine candidates are judged; above it, each piece is checked as it
# is exported (on real hidden states) and the whole files are not loaded: that would cost their size in
# memory, which the streaming export exists to avoid.
WHOLE_FILE_CHECK_BYTES = 2 * GIB
