"""The INT8 stage of the export, in the deliberate order (issue 5):

restructure -> cleanup passes -> calibrate on the *unfused* graph -> Q/DQ (and sensitivity exclusion)
-> target fusions that keep Q/DQ semantics. Fusing before calibration hides the tensors that need
ranges and breaks static quantization (onnxruntime #8770), so only cleanup runs before Q/DQ.

Two artifacts: `model.int8.onnx` (Q/DQ for TensorRT, standard ops) and `model.int8.cpu.onnx` (what
ONNX Runtime's integer kernels run fast on a CPU). Both are gated on held-out accuracy by
exporter/quantize/int8.py; here they are also compared with the PyTorch reference for the report. Where
OpenVINO is installed, a third: `model.int8.openvino.onnx`, the Q/DQ file as OpenVINO runs it best
(exporter/quantize/openvino_int8.py), a candidate for the CPU engine (engines/cpu_selection.py).
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from export_errors import InputError
from exporter.config import ExportConfig
from exporter.export.external_data import BackgroundSave, save_onnx
from exporter.quantize import decoder_calibration
from exporter.quantize.calibration import CalibrationData, load_stage_calibration
from exporter.quantize.cpu_int8 import BackgroundBuild
from exporter.quantize.int8 import QuantConfig, QuantResult, quantize
from exporter.quantize.int8 import start_cpu_first_build as start_quantize_cpu_first_build
from exporter.quantize.openvino_int8 import OPENVINO_FILE, NncfJob, build_openvino_file, start_nncf
from graph_passes.pipeline import PipelineReport, optimize

logger = logging.getLogger(__name__)

# SmoothQuant stays on (QuantConfig's default) before the decoder's Q/DQ file (only activations whose
# channel max / median > 8). Measured with tools/bench_decoder_calibration.py --prompts 32 (512 generated
# tokens vs fp32): on llama-512 with planted outlier channels after every RMSNorm (the pattern of trained
# LLMs), logit cosine 0.99394 -> 0.99867, teacher-forced agreement 0.721 -> 0.871, layers kept high
# precision 12 -> 0, INT8 stage 448 -> 257 s. On random-init models no activation passes the threshold (a
# no-op); forcing it on every MatMul input ("smooth-all") hurt there (llama-512 .npz: cosine 0.99869 ->
# 0.99860, agreement 0.863 -> 0.816).
DECODER_SMOOTHING = True
# The decoder's CPU file is quantized from our onnxruntime-fused graph (RotaryEmbedding +
# GroupQueryAttention per layer, its projections INT8). Measured with tools/bench_decoder.py (llama-512,
# 8 layers, GQA 8:2, prompt 128, 64 new tokens, 2 threads, AVX2 EPYC, 7-bit weights): vs dynamic INT8 of
# the unfused graph, prefill 1.08x and decode 1.47x faster (median of per-round ratios), logit cosine vs
# fp32 unchanged (0.9976 both).
DECODER_CPU_FUSION = True
CLEANED_FILE = "model.cleaned.onnx"  # the cleaned graph's file, the INT8 stage's source


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
    smoothing: bool | None = None,
    padding_side: str | None = None,
    openvino_file: bool = False,
    openvino_job: NncfJob | None = None,
    fused: Path | None = None,
    fused_checked: float | None = None,
    cleaned: tuple[onnx.ModelProto, PipelineReport, BackgroundSave] | None = None,
    cpu_first_build: BackgroundBuild | None = None,
    on_file: Callable[[Path, str, bool], None] | None = None,
) -> tuple[QuantResult, dict[str, Any]]:
    """Quantize the exported compact fp32 graph; returns the result and the report section.
    `decoder_with_past`: calibrate on prefills (position ids and empty pasts added to the token ids)
    followed by `config.calibration_decode_steps` decode steps with the past fed back
    (exporter/quantize/decoder_calibration.py). `smoothing`: SmoothQuant migration before the Q/DQ file (None: the
    measured default for the model kind). `padding_side`: where calibration text is padded (None: the
    tokenizer's own; causal LMs pad on the left, as generation does). `openvino_file`: also write
    `model.int8.openvino.onnx` where OpenVINO is installed (the CPU engine's candidate); `openvino_job`:
    NNCF's recipe for that file, already running (`start_openvino_file`; the caller stops it on failure).
    `fused`: graph_passes' onnxruntime pipeline already run on `exported` for `family` (the export's
    model.onnx), which the decoder's CPU file is quantized from instead of fusing again
    (QuantConfig.cpu_fused_source); `fused_checked`: its max abs error where the export checked it against
    PyTorch under the fp32 gate (QuantConfig.cpu_fused_checked). `cleaned`: the cleanup stage's graph and report where graph_passes
    already ran it on `exported` (the same passes for every target: `optimize_ir`'s `on_cleaned`), and its
    file being written in the background under CLEANED_FILE. `cpu_first_build`: `start_cpu_first_build`'s
    child, taken by `quantize` if it is the build needed.
    `on_file(path, variant, judged)`: called with each INT8 file as soon as it is final (variant "cpu": the CPU
    file, when `quantize` returns; "tensorrt": the Q/DQ file, once its target fusion is saved), so the caller
    can open it for its checks beside this stage's remaining work (one core of Python: fusion, saves, the
    OpenVINO file); `judged`: `result.tensorrt_session` computes that file (its fusion changed nothing)."""
    with tempfile.TemporaryDirectory() as tmp:
        cleaned_path = Path(tmp) / CLEANED_FILE
        if cleaned is None:
            graph, cleanup = optimize(
                onnx.load(str(exported)), "tensorrt", stages=("cleanup",), family=family
            )
            save_onnx(graph, cleaned_path)
        else:
            graph, cleanup, saving = cleaned
            saving.move_to(cleaned_path)
        del cleaned
        calibration = _calibration(
            config, tokenizer_path, input_names, sequence_length, vocab_size, padding_side
        )
        decoder_report = None
        if decoder_with_past:
            steps = config.calibration_decode_steps
            steps = decoder_calibration.DECODE_STEPS if steps is None else steps
            calibration, decoder_report = _decoder_calibration(calibration, cleaned_path, steps, graph.graph)
        del graph  # the file is the INT8 stage's source from here
        quant_config = _quant_config(config, family, decoder_with_past, smoothing, fused, fused_checked)
        result = quantize(cleaned_path, work, calibration, quant_config, cpu_first_build=cpu_first_build)
    if on_file is not None and result.cpu_path is not None:
        on_file(result.cpu_path, "cpu", False)
    judged = result.take_tensorrt_model()
    fused, fusion = optimize(judged, "tensorrt", stages=("fusion",), family=family)
    if result.tensorrt_session is not None and not same_graph(judged, fused):
        result.tensorrt_session = None  # the fusion changed what the judge's session computes
    del judged
    save_onnx(fused, result.tensorrt_path)
    del fused
    if on_file is not None:
        on_file(result.tensorrt_path, "tensorrt", result.tensorrt_session is not None)
    section = {
        **(
            {
                "openvino": _openvino_file(
                    result,
                    work,
                    None if decoder_with_past else exported,
                    None if decoder_with_past else calibration.judge_batches("calibration"),
                    openvino_job,
                )
            }
            if openvino_file
            else {}
        ),
        **result.report,
        "order": ["restructure", "cleanup", "calibrate (unfused)", "Q/DQ + sensitivity", "target fusion"],
        "cleanup_passes": cleanup.to_json(),
        "tensorrt_fusion_passes": fusion.to_json(),
        **({"decoder_calibration": decoder_report} if decoder_report else {}),
    }
    return result, section


def same_graph(a: onnx.ModelProto, b: onnx.ModelProto) -> bool:
    """Whether `b` computes exactly what `a` does: the same graph inputs and outputs, nodes (attributes
    included) in the same order, initializers (name, type, shape, bytes), opsets and functions. Shape
    inference's value_info may differ: it changes no computation."""
    ga, gb = a.graph, b.graph
    if [i.name for i in ga.input] != [i.name for i in gb.input]:
        return False
    if [o.name for o in ga.output] != [o.name for o in gb.output]:
        return False
    if len(ga.node) != len(gb.node) or len(ga.initializer) != len(gb.initializer):
        return False
    if any(x.SerializeToString() != y.SerializeToString() for x, y in zip(ga.node, gb.node, strict=True)):
        return False
    if {(o.domain, o.version) for o in a.opset_import} != {(o.domain, o.version) for o in b.opset_import}:
        return False
    if [f.SerializeToString() for f in a.functions] != [f.SerializeToString() for f in b.functions]:
        return False
    tensors = {t.name: t for t in gb.initializer}
    for x in ga.initializer:
        y = tensors.get(x.name)
        if y is None or x.data_type != y.data_type or list(x.dims) != list(y.dims):
            return False
        if not np.array_equal(numpy_helper.to_array(x), numpy_helper.to_array(y)):
            return False
    return True


def _quant_config(
    config: ExportConfig,
    family: str,
    decoder_with_past: bool,
    smoothing: bool | None = None,
    fused: Path | None = None,
    fused_checked: float | None = None,
) -> QuantConfig:
    """The INT8 step's settings for this export (the stage and its early CPU build ask the same);
    `fused_checked`: `fused`'s max abs error from the export's fp32-gated check (QuantConfig.cpu_fused_checked)."""
    quant_config = QuantConfig(min_cosine=config.accuracy_target, cpu_weight_range=config.cpu_int8_weights)
    if decoder_with_past:
        quant_config.smoothing = DECODER_SMOOTHING
        quant_config.cpu_graph_passes_family = family if DECODER_CPU_FUSION else None
        quant_config.cpu_fused_source = fused
        quant_config.cpu_fused_checked = fused_checked if fused is not None else None
    if smoothing is not None:
        quant_config.smoothing = smoothing
    if config.calibration_method:
        quant_config.method = config.calibration_method
    return quant_config


def start_cpu_first_build(
    fused: Path, config: ExportConfig, family: str, tmp: Path
) -> BackgroundBuild | None:
    """A KV-cache decoder's CPU INT8 file, first build (everything quantized, from the export's fused
    model.onnx), started in a child interpreter as soon as model.onnx is written, for `run_int8_stage`'s
    `cpu_first_build` (exporter/quantize/int8.py `start_cpu_first_build`); None where it would not be built
    so. The caller closes it if the INT8 stage never takes it."""
    if not DECODER_CPU_FUSION:
        return None
    return start_quantize_cpu_first_build(tmp, _quant_config(config, family, True, fused=fused))


def start_openvino_file(
    exported: Path,
    work: Path,
    config: ExportConfig,
    *,
    tokenizer_path: Path | None,
    input_names: list[str],
    sequence_length: int,
    vocab_size: int,
    padding_side: str | None = None,
) -> NncfJob | None:
    """An encoder's OpenVINO INT8 file by NNCF's recipe, started in a forked process as soon as its inputs
    exist (the compact fp32 graph; the calibration samples `run_int8_stage` loads, loaded the same way), so
    that it runs beside the graph passes and the INT8 search (exporter/quantize/openvino_int8.py); None
    where OpenVINO or NNCF is missing (`run_int8_stage` then builds the file itself, or says why not)."""
    from engines.openvino_runner import openvino_unavailable_reason

    if openvino_unavailable_reason() is not None:
        return None
    calibration = _calibration(config, tokenizer_path, input_names, sequence_length, vocab_size, padding_side)
    return start_nncf(exported, calibration.judge_batches("calibration"), work / OPENVINO_FILE)


def _calibration(
    config: ExportConfig,
    tokenizer_path: Path | None,
    input_names: list[str],
    sequence_length: int,
    vocab_size: int,
    padding_side: str | None,
) -> CalibrationData:
    return load_stage_calibration(
        config, tokenizer_path, input_names, sequence_length, vocab_size, padding_side
    )


def _openvino_file(
    result: QuantResult,
    work: Path,
    fp32_path: Path | None,
    samples: list[dict[str, np.ndarray]] | None,
    job: NncfJob | None = None,
) -> dict[str, Any]:
    """The OpenVINO INT8 file, where OpenVINO can run it (else the reason, and no file): NNCF's recipe on
    the compact fp32 graph where NNCF is installed (encoders; `job`'s file where it was started early), else
    the Q/DQ file rewritten."""
    from engines.openvino_runner import openvino_unavailable_reason

    reason = openvino_unavailable_reason()
    if reason is not None:
        return {"file": None, "reason": reason}
    start = time.perf_counter()
    result.openvino_path = work / OPENVINO_FILE
    return build_openvino_file(
        result.tensorrt_path, result.openvino_path, fp32_path=fp32_path, samples=samples, job=job
    ) | {"seconds": time.perf_counter() - start}


def _decoder_calibration(
    data: CalibrationData, model_path: Path, decode_steps: int, graph: onnx.GraphProto | None = None
) -> tuple[CalibrationData, dict[str, Any]]:
    """Prefill + decode-step feeds for the decoder-with-past graph, and what the report says about them."""
    if decode_steps < 0:
        raise InputError("--calibration-decode-steps", f"must be >= 0, got {decode_steps}")
    start = time.perf_counter()
    data = decoder_calibration.for_decoder(data, model_path, decode_steps, graph)
    return data, {
        "decode_steps": decode_steps,
        "rule": (
            f"each sample: a prefill, then {decode_steps} decode steps with the fp32 past fed back; samples "
            f"with more than {2 * decode_steps} real tokens hold their last {decode_steps} back for the steps "
            "(teacher forcing), shorter ones continue with the fp32 argmax"
            if decode_steps
            else "prefills only (empty pasts)"
        ),
        "seconds": time.perf_counter() - start,
    }
