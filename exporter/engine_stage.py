"""The engine stage: build the TensorRT engine where TensorRT can run, else say why ONNX Runtime serves.

On a machine without TensorRT the Q/DQ graph still goes through TensorRT's pre-build checks (pure
code): the report then says whether the artifact meant for TensorRT would be accepted by its parser.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import onnx

from engines.onnx_inputs import onnx_input_specs
from engines.selection import BackendChoice
from engines.tensorrt.builder import DEFAULT_MAX_BATCH, TensorRTBuildConfig, build_engine, prebuild_check
from engines.tensorrt.profiles import default_profiles

logger = logging.getLogger(__name__)


def prebuild_problems(tensorrt_onnx: Path) -> list[Any]:
    """TensorRT's pre-build checks of the file (pure code: one core, ~0.12 s on the 45M Llama's Q/DQ file)."""
    return prebuild_check(onnx.load(str(tensorrt_onnx), load_external_data=False))


def run_engine_stage(
    choice: BackendChoice, tensorrt_onnx: Path, max_sequence: int, problems: list[Any] | None = None
) -> dict[str, Any]:
    """Build `model.plan` beside `tensorrt_onnx` when TensorRT was chosen; always run the pre-build checks
    (`problems`: `prebuild_problems(tensorrt_onnx)` already run, e.g. beside the INT8 checks)."""
    problems = prebuild_problems(tensorrt_onnx) if problems is None else problems
    result: dict[str, Any] = {
        "tensorrt_onnx": tensorrt_onnx.name,
        "tensorrt_prebuild_problems": [str(p) for p in problems],
    }
    if choice.name != "tensorrt":
        for name, why in choice.skipped.items():
            logger.info("backend: %s (%s); %s skipped: %s", choice.name, choice.reason, name, why)
        return result
    specs = onnx_input_specs(onnx.load(str(tensorrt_onnx), load_external_data=False))
    profile = default_profiles(specs, DEFAULT_MAX_BATCH, max_sequence)
    build = build_engine(
        tensorrt_onnx, tensorrt_onnx.parent / "model.plan", TensorRTBuildConfig(profiles=(profile,))
    )
    result["tensorrt_build"] = build.to_json()
    return result
