"""ONNX Runtime sessions for the export's checks, one shared while a stage checks the same file twice.

A check runs a file on ONNX Runtime's CPU provider with its graph optimizations off (they cannot hide a
bug of ours), or with its defaults where a file is judged as deployed (`optimized`). The decoder's export
built two such sessions for `model.exported.onnx` with the same options: its own validation
(exporter/export/decoder_with_past.py) and the export stage's check on the validation feeds; each is ~0.4 s
for the 45M-parameter Llama's 221 MB graph. Inside `shared()`, `check_session` returns the last session it
built when the same file (path, size, modification time) is asked for with the same options, else builds
a new one and keeps that one only: at most one session is held beyond its use, and none after the block.
Outside `shared()` every call builds a new session, as before. The session is the same object, so the
numbers a check reads are the ones a fresh session gives (same file, same options, same inputs)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# (resolved path, optimized, size, mtime_ns) -> session, at most one entry; None outside `shared()`
_last: dict[tuple[str, bool, int, int], Any] | None = None


@contextlib.contextmanager
def shared() -> Iterator[None]:
    """Within the block, `check_session` reuses the last session for the same file and options."""
    global _last
    outer = _last
    if outer is None:
        _last = {}
    try:
        yield
    finally:
        if outer is None:
            _last = None


def check_session(path: str | Path, optimized: bool = False) -> Any:
    """An ONNX Runtime CPU session on `path`: graph optimizations off, or its defaults when `optimized`."""
    key = _key(path, optimized)
    if _last is not None and key in _last:
        return _last[key]
    session = _session(str(path), optimized)
    _keep(key, session)
    return session


def session_from_bytes(data: bytes, optimized: bool = False) -> Any:
    """`check_session`'s session built from a file's bytes (a model with no external data): ONNX Runtime
    builds it outside the GIL, so while another thread writes those bytes to disk. Same model bytes, same
    options: the same session (and outputs) as one built from the file."""
    return _session(data, optimized)


def _key(path: str | Path, optimized: bool) -> tuple[str, bool, int, int]:
    stat = os.stat(path)
    return (str(Path(path).resolve()), optimized, stat.st_size, stat.st_mtime_ns)


def _keep(key: tuple[str, bool, int, int], session: Any) -> None:
    if _last is not None:
        _last.clear()  # only the last one is kept
        _last[key] = session


def _session(model: str | bytes, optimized: bool) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    if not optimized:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
