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
    int4_block_size: int = 32
    int4_lm_head: Literal["auto", "int4", "int8"] = "auto"
    int4_accuracy_target: float | None = None  # None: the "int4" row of exporter/validate/tolerances.py
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
