"""The INT8 stage of the export, in the deliberate order (issue 5):

restructure -> cleanup passes -> calibrate on the *unfused* graph -> Q/DQ (and sensitivity exclusion)
-> target fusions that keep Q/DQ semantics. Fusing before calibration hides the tensors that need
ranges and breaks static quantization (onnxruntime #8770), so only cleanup runs before Q/DQ.

Two artifacts: `model.int8.onnx` (Q/DQ for TensorRT, standard ops) and `model.int8.cpu.onnx` (what
ONNX Runtime's integer kernels run fast on a CPU). Both are gated on held-out accuracy by
exporter/quantize.py; here they are also compared with the PyTorch reference for the report.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

import onnx

from exporter import decoder_calibration
from exporter.calibration import load_calibration
from exporter.config import ExportConfig
from exporter.external_data import save_onnx
from exporter.quantize import QuantConfig, QuantResult, quantize
from graph_passes.pipeline import optimize

logger = logging.getLogger(__name__)


def run_int8_stage(
    exported: Path,
    work: Path,
    config: ExportConfig,
    *,
    family: str,
    tokenizer_path: Path | None,
    input_names: list[str],
    sequence_length: int,
    vocab_size: int,
    decoder_with_past: bool = False,
) -> tuple[QuantResult, dict[str, Any]]:
    """Quantize the exported compact fp32 graph; returns the result and the report section.
    `decoder_with_past`: calibrate on prefills (position ids and empty pasts added to the token ids)."""
    with tempfile.TemporaryDirectory() as tmp:
        cleaned, cleanup = optimize(onnx.load(str(exported)), "tensorrt", stages=("cleanup",), family=family)
        cleaned_path = Path(tmp) / "model.cleaned.onnx"
        save_onnx(cleaned, cleaned_path)
        calibration = load_calibration(
            config.calibration,
            tokenizer_path,
            input_names,
            config.batch_size,
            sequence_length,
            num_samples=config.calibration_samples,
            seed=config.seed,
            vocab_size=vocab_size,
        )
        if decoder_with_past:
            calibration = decoder_calibration.for_decoder(calibration, cleaned_path)
        quant_config = QuantConfig(min_cosine=config.accuracy_target)
        if config.calibration_method:
            quant_config.method = config.calibration_method
        result = quantize(cleaned_path, work, calibration, quant_config)
    fused, fusion = optimize(
        onnx.load(str(result.tensorrt_path)), "tensorrt", stages=("fusion",), family=family
    )
    save_onnx(fused, result.tensorrt_path)
    section = {
        **result.report,
        "order": ["restructure", "cleanup", "calibrate (unfused)", "Q/DQ + sensitivity", "target fusion"],
        "cleanup_passes": cleanup.to_json(),
        "tensorrt_fusion_passes": fusion.to_json(),
    }
    return result, section
