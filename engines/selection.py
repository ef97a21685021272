"""Which backend runs here, and why the others were skipped.

`auto` picks TensorRT when a real TensorRT imports and a CUDA GPU is present, else the CPU, where the
export then chooses the CPU engine by measurement (engines/cpu_selection.py: ONNX Runtime, always
present, or OpenVINO where installed); `openvino` asks for OpenVINO's candidates only. The reasons are kept (`BackendChoice.skipped`) so the CLI can print them and write
them into report.json: a fallback is always said, never silent.

"A real TensorRT": the `tensorrt-stubs` package installs a `tensorrt/` folder holding only
`__init__.pyi`, which Python imports as an empty namespace package. `import tensorrt` then
succeeds without TensorRT, so we also require `tensorrt.Builder` to exist.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Literal

from export_errors import BackendUnavailableError

BackendName = Literal["auto", "tensorrt", "onnxruntime", "openvino"]
BACKENDS: tuple[str, ...] = ("auto", "tensorrt", "onnxruntime", "openvino")
INSTALL_HINT = 'pip install "export-engine[tensorrt]" on a machine with an NVIDIA GPU'


@dataclasses.dataclass(frozen=True)
class BackendChoice:
    """The chosen backend, why, and each skipped backend with the reason it was skipped."""

    name: str
    reason: str
    skipped: dict[str, str] = dataclasses.field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def tensorrt_unavailable_reason() -> str | None:
    """None when a real TensorRT Python module imports, else why not (one line)."""
    try:
        trt = importlib.import_module("tensorrt")
    except Exception as exc:  # ImportError, or a broken install raising OSError on its libraries
        return f"the tensorrt module does not import ({type(exc).__name__}: {exc}); {INSTALL_HINT}"
    if not hasattr(trt, "Builder"):
        return f"the tensorrt module found is not TensorRT (type stubs only, no tensorrt.Builder); {INSTALL_HINT}"
    return None


def cuda_unavailable_reason() -> str | None:
    """None when torch sees a CUDA GPU (the TensorRT runner allocates device buffers with torch.cuda)."""
    try:
        import torch
    except ImportError as exc:
        return f"torch does not import ({exc})"
    if torch.version.cuda is None:
        return f"no CUDA GPU usable: torch {torch.__version__} is a CPU-only build"
    if not torch.cuda.is_available():
        return "no CUDA GPU: torch.cuda.is_available() is False"
    return None


def tensorrt_skip_reason() -> str | None:
    """None when TensorRT can build and run engines here, else the first reason it cannot."""
    return tensorrt_unavailable_reason() or cuda_unavailable_reason()


def select_backend(requested: BackendName | str = "auto") -> BackendChoice:
    """Resolve `--backend`. `tensorrt` where it cannot run raises `BackendUnavailableError`."""
    if requested not in BACKENDS:
        raise BackendUnavailableError("--backend", f"unknown backend {requested!r}; choose one of {BACKENDS}")
    if requested == "onnxruntime":
        return BackendChoice(
            "onnxruntime", "requested with --backend onnxruntime", {"tensorrt": "not requested"}
        )
    if requested == "openvino":
        from engines.openvino_runner import openvino_unavailable_reason

        why_not_ov = openvino_unavailable_reason()
        if why_not_ov is not None:
            raise BackendUnavailableError("--backend openvino", why_not_ov)
        return BackendChoice(
            "openvino",
            "requested with --backend openvino",
            {"tensorrt": "not requested", "onnxruntime": "not requested"},
        )
    why_not_trt = tensorrt_skip_reason()
    if requested == "tensorrt":
        if why_not_trt is not None:
            raise BackendUnavailableError("--backend tensorrt", why_not_trt)
        return BackendChoice(
            "tensorrt", "requested with --backend tensorrt", {"onnxruntime": "not requested"}
        )
    if why_not_trt is None:
        return BackendChoice(
            "tensorrt", "auto: TensorRT imports and a CUDA GPU is present", {"onnxruntime": "TensorRT chosen"}
        )
    return BackendChoice(
        "onnxruntime",
        "auto: TensorRT cannot run here; the CPU engine is chosen by measurement (report: engine.cpu)",
        {"tensorrt": why_not_trt},
    )
