"""The export configuration: the Python API takes it, the CLI only fills it from flags."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Literal

Precision = Literal["int8", "fp32", "int4"]
Backend = Literal["auto", "tensorrt", "onnxruntime", "openvino"]


@dataclasses.dataclass
class ExportConfig:
    """Every knob of `export_engine`. Defaults are what the README documents."""

    precision: Precision = "int8"
    adapter: Path | None = None  # PEFT LoRA adapter folder (default: MODEL_DIR/adapter if present)
    force: bool = False  # replace a non-empty OUT_DIR
    backend: Backend = "auto"
    # pin the CPU engine instead of choosing it by measurement (engines/cpu_selection.py NAMES)
    cpu_engine: str | None = None
    # the task (exporter/tasks/registry.py); None: the adapter's task_type, else config.json's architectures
    task: str | None = None
    opset: int = 17
    # KV-cache decoders: export layer by layer from the safetensors shards (exporter/export/streaming);
    # auto: when the fp32 weights exceed exporter.export.streaming.choose.THRESHOLD_BYTES
    streaming: Literal["auto", "on", "off"] = "auto"
    # validation / calibration shapes
    batch_size: int = 2
    sequence_length: int = 128
    validation_samples: int = 8
    calibration: str | None = None  # path to .txt/.jsonl/.npz, "random", or None for the shipped corpus
    calibration_samples: int = 128
    calibration_method: str | None = None  # None: the measured default of exporter.quantize.int8
    # KV-cache decoders: decode steps calibrated after each prefill (0: prefills only; None: the default
    # of exporter.quantize.decoder_calibration)
    calibration_decode_steps: int | None = None
    # CPU INT8 file: 7-bit weights where ONNX Runtime's u8 x s8 kernel saturates (exporter/quantize/cpu_features.py)
    cpu_int8_weights: Literal["auto", "full", "reduced"] = "auto"
    accuracy_target: float = 0.99  # INT8 mean token cosine vs fp32 on held-out data
    # INT4 weight-only (causal LMs with a KV cache; exporter/quantize/int4_stage.py)
    int4_method: Literal["awq", "rtn"] | None = None  # None: the measured default (AWQ-style)
    # None: the INT4 stage's measured default (int4_stage.DEFAULT_BLOCK_SIZE); the per-piece streamed file 32
    int4_block_size: int | None = None
    int4_lm_head: Literal["auto", "int4", "int8"] = "auto"
    int4_accuracy_target: float | None = None  # None: the "int4" row of exporter/validate/tolerances.py
    # the prompt on a dynamic INT8 file beside the INT4 one (exporter/quantize/int4_pair.py): "auto" keeps it
    # where it passes its gate and its prefill is faster (timed unless --no-benchmark), "int8" always (a gate
    # miss raises), "off" never
    int4_prefill: Literal["auto", "int8", "off"] = "auto"
    # INT8 of classifiers, taggers and QA models: held-out task agreement with fp32 (labels, spans)
    agreement_target: float = 0.99
    eval_data: Path | None = None  # labeled JSONL (exporter/tasks/eval_data.py): accuracy at every stage
    # graph passes
    strict_fusion: bool = False
    sparsity: Literal["tag", "enforce", "off"] = "tag"
    # benchmarking of every stage (report's stage table)
    benchmark: bool = True
    benchmark_threads: int = 2
    benchmark_iterations: int = 30  # interleaved rounds of the stage table (and the CPU engine's candidates)
    # safety
    allow_pickle: bool = False  # .bin/.pt checkpoints (loaded with weights_only=True)
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class Range:
    """The values a numeric knob accepts; `why` is said when one is outside (the user fixes it from it)."""

    low: float | None = None  # inclusive
    high: float | None = None  # inclusive
    why: str = ""
    power_of_two: bool = False

    def problem(self, value: float | None) -> str | None:
        """None when `value` is allowed (None means "the default" and is always allowed), else why not."""
        if value is None:
            return None
        if value != value or value in (float("inf"), float("-inf")):
            return f"must be a finite number, got {value}"
        bounds = (
            f"between {self.low} and {self.high}"
            if self.low is not None and self.high is not None
            else f">= {self.low}"
            if self.low is not None
            else f"<= {self.high}"
        )
        outside = (self.low is not None and value < self.low) or (self.high is not None and value > self.high)
        if not outside and self.power_of_two and int(value) & (int(value) - 1):
            outside, bounds = True, f"a power of two >= {self.low}"
        if not outside:
            return None
        return f"must be {bounds}, got {value}" + (f" ({self.why})" if self.why else "")


# config field -> (its CLI flag, the values it accepts); checked by the CLI at parse time and by the API
RANGES: dict[str, tuple[str, Range]] = {
    "batch_size": ("--batch-size", Range(1)),
    "sequence_length": ("--sequence-length", Range(2, why="validation and calibration need 2+ tokens")),
    "validation_samples": ("validation_samples", Range(1)),
    "calibration_samples": ("--calibration-samples", Range(1)),
    "calibration_decode_steps": ("--calibration-decode-steps", Range(0)),
    "accuracy_target": ("--accuracy-target", Range(0, 1, "a mean cosine")),
    "int4_block_size": (
        "--int4-block-size",
        Range(16, 4096, "ONNX Runtime's MatMulNBits blocks", power_of_two=True),
    ),
    "int4_accuracy_target": ("--int4-accuracy-target", Range(0, 1, "a mean cosine")),
    "agreement_target": ("--agreement-target", Range(0, 1, "a fraction of agreeing outputs")),
    "benchmark_threads": ("--threads", Range(1)),
    "benchmark_iterations": ("benchmark_iterations", Range(1)),
    "seed": ("--seed", Range(0, 2**32 - 1, "NumPy's seeds")),
}


def check_ranges(config: ExportConfig) -> None:
    """Raise an InputError naming the flag (or field) of the first value outside its range."""
    from export_errors import InputError

    for field, (flag, accepted) in RANGES.items():
        problem = accepted.problem(getattr(config, field))
        if problem is not None:
            raise InputError(flag, problem)
