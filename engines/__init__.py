"""Engines: one runner interface (engines.base.Runner) over ONNX Runtime, OpenVINO and TensorRT.

Importing this package imports none of onnxruntime, openvino or tensorrt: runners import their backend
when constructed or entered, and tensorrt is imported only inside engines/ (ruff bans it
elsewhere), so every CPU path works without TensorRT (or OpenVINO) installed.
"""

from __future__ import annotations

from pathlib import Path

from engines.base import Runner, TensorSpec
from engines.selection import BackendChoice, select_backend, tensorrt_skip_reason
from export_errors import BackendUnavailableError, InputError

__all__ = ["BackendChoice", "Runner", "TensorSpec", "load_runner", "select_backend"]


# Which backends read which artifact; the first is what "auto" picks.
READERS: dict[str, tuple[str, ...]] = {
    ".onnx": ("onnxruntime", "openvino"),
    ".xml": ("openvino",),
    ".plan": ("tensorrt",),
    ".engine": ("tensorrt",),
}


def load_runner(
    path: str | Path,
    backend: str = "auto",
    threads: int | None = None,
    spinning: bool = True,
    precision: str | None = None,
) -> Runner:
    """A runner for an artifact: `.onnx` -> ONNX Runtime (CPU) or OpenVINO, `.xml` -> OpenVINO,
    `.plan` -> TensorRT.

    `backend` is "auto" (the suffix's first reader) or one of the suffix's readers; another is an
    `InputError`. `threads` applies to the CPU runtimes, `spinning` to ONNX Runtime, `precision`
    ("f32" or "bf16", OpenVINO's inference precision hint) to OpenVINO only. Use the runner as a
    context manager: nothing is loaded before `__enter__`.
    """
    path = Path(path)
    readers = READERS.get(path.suffix)
    if readers is None:
        raise InputError(path, f"unknown artifact type {path.suffix!r}: expected one of {sorted(READERS)}")
    if backend != "auto" and backend not in readers:
        raise InputError(
            path, f"a {path.suffix} file runs on {' or '.join(readers)}, not on --backend {backend}"
        )
    wanted = readers[0] if backend == "auto" else backend
    if precision is not None and wanted != "openvino":
        raise InputError(path, f"precision {precision!r} is an OpenVINO setting, not one of {wanted}")
    if wanted == "onnxruntime":
        from engines.onnxruntime_runner import OnnxRuntimeRunner

        return OnnxRuntimeRunner(path, threads=threads, spinning=spinning)
    if wanted == "openvino":
        from engines.openvino_runner import OpenVinoRunner

        return OpenVinoRunner(path, threads=threads, precision=precision or "f32")
    reason = tensorrt_skip_reason()
    if reason is not None:
        raise BackendUnavailableError(path, f"a TensorRT engine cannot run here: {reason}")
    from engines.tensorrt.runner import TensorRTRunner

    return TensorRTRunner(path)
