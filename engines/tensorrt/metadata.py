"""The JSON beside every engine, and the refusal of an engine built elsewhere.

A TensorRT plan is tied to the TensorRT version and the GPU it was built on (TensorRT's
"version compatibility" and "hardware compatibility" modes are opt-in and slower). Loading a
foreign plan fails deep inside TensorRT or, worse, runs tactics tuned for another GPU; the
metadata lets us refuse it up front with a message saying what differs and what to do.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from engines.tensorrt.profiles import OptimizationProfile
from export_errors import InputError

METADATA_FORMAT = 1


@dataclasses.dataclass(frozen=True)
class GpuInfo:
    name: str
    compute_capability: str  # "8.6"


def metadata_path_for(plan_path: str | Path) -> Path:
    """`model.plan` -> `model.plan.json`."""
    plan_path = Path(plan_path)
    return plan_path.with_name(plan_path.name + ".json")


def engine_metadata(
    *,
    trt_version: str,
    gpu: GpuInfo,
    profiles: Sequence[OptimizationProfile],
    precision: str,
    strongly_typed: bool,
    sparse_weights: bool,
    onnx_path: str | Path | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The metadata JSON (as a dict) written beside the plan."""
    return {
        "format": METADATA_FORMAT,
        "tensorrt_version": trt_version,
        "gpu": gpu.name,
        "compute_capability": gpu.compute_capability,
        "precision": precision,
        "strongly_typed": strongly_typed,
        "sparse_weights": sparse_weights,
        "profiles": [p.to_json() for p in profiles],
        "onnx": str(onnx_path) if onnx_path is not None else None,
        **(extra or {}),
    }


def write_metadata(plan_path: str | Path, metadata: dict[str, Any]) -> Path:
    path = metadata_path_for(plan_path)
    path.write_text(json.dumps(metadata, indent=2) + "\n")
    return path


def read_metadata(plan_path: str | Path) -> dict[str, Any]:
    path = metadata_path_for(plan_path)
    if not path.is_file():
        raise InputError(path, "no engine metadata beside the plan: rebuild the engine with export-engine")
    try:
        data: dict[str, Any] = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise InputError(path, f"engine metadata is not valid JSON ({exc})") from exc
    return data


def _release(version: str) -> str:
    """TensorRT plans are tied to major.minor.patch; the fourth number is the build."""
    return ".".join(version.split(".")[:3])


def check_engine_compat(
    metadata: dict[str, Any], trt_version: str, gpu: GpuInfo, where: str | Path = "engine"
) -> None:
    """Raise `InputError` when the engine was built by another TensorRT release or on another GPU."""
    built_trt = str(metadata.get("tensorrt_version", "?"))
    if _release(built_trt) != _release(trt_version):
        raise InputError(
            where,
            f"engine built with TensorRT {built_trt}, this machine has TensorRT {trt_version}: rebuild it here",
        )
    built_cc, built_gpu = str(metadata.get("compute_capability", "?")), str(metadata.get("gpu", "?"))
    if built_cc != gpu.compute_capability or built_gpu != gpu.name:
        raise InputError(
            where,
            f"engine built on {built_gpu} (compute capability {built_cc}), this GPU is {gpu.name} "
            f"(compute capability {gpu.compute_capability}): rebuild it here",
        )
