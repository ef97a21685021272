"""Engines: one runner interface (engines.base.Runner) over ONNX Runtime and TensorRT.

Importing this package imports neither onnxruntime nor tensorrt: runners import their backend
when constructed or entered, and tensorrt is imported only inside engines/ (ruff bans it
elsewhere), so every CPU path works without TensorRT installed.
"""

from __future__ import annotations

from pathlib import Path

from engines.base import Runner, TensorSpec
from engines.selection import BackendChoice, select_backend, tensorrt_skip_reason
from export_errors import BackendUnavailableError, InputError

__all__ = ["BackendChoice", "Runner", "TensorSpec", "load_runner", "select_backend"]


def load_runner(
    path: str | Path, backend: str = "auto", threads: int | None = None, spinning: bool = True
) -> Runner:
    """A runner for an artifact by its suffix: `.onnx` -> ONNX Runtime (CPU), `.plan` -> TensorRT.

    `backend` may confirm the suffix's backend ("onnxruntime" / "tensorrt") or be "auto"; a
    mismatch is an `InputError`. `threads` applies to ONNX Runtime. Use the runner as a context
    manager: nothing is loaded before `__enter__`.
    """
    path = Path(path)
    by_suffix = {".onnx": "onnxruntime", ".plan": "tensorrt", ".engine": "tensorrt"}
    wanted = by_suffix.get(path.suffix)
    if wanted is None:
        raise InputError(path, f"unknown artifact type {path.suffix!r}: expected one of {sorted(by_suffix)}")
    if backend not in ("auto", wanted):
        raise InputError(path, f"a {path.suffix} file runs on {wanted}, not on --backend {backend}")
    if wanted == "onnxruntime":
        from engines.onnxruntime_runner import OnnxRuntimeRunner

        return OnnxRuntimeRunner(path, threads=threads, spinning=spinning)
    reason = tensorrt_skip_reason()
    if reason is not None:
        raise BackendUnavailableError(path, f"a TensorRT engine cannot run here: {reason}")
    from engines.tensorrt.runner import TensorRTRunner

    return TensorRTRunner(path)
