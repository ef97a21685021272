"""An export that fits in one file, made in memory and checked while a thread writes its file.

torch.onnx.export to a path spends the kernel's time writing the file (~0.6 s for the 45M-parameter Llama's
221 MB here) before the check's ONNX Runtime session reads it back (~0.6 s). Made in memory
(`torchscript_export_bytes`: the same bytes), the file is written by a thread (`BackgroundSave`) while ONNX
Runtime builds the check session from those bytes (`session_from_bytes`, outside the GIL) and the check runs
on it. Once written, the session is handed to `sessions.adopt`, so a stage's later check of the file (inside
`sessions.shared()`) reuses it instead of building a second one; and the bytes go on to the graph passes,
which parse them instead of reading the file back (`onnx.load` measured 0.26 s, parsing the bytes 0.13 s).
A model needing external data is exported to its path as before (`torchscript_export`), `data` None.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from exporter.export.external_data import BackgroundSave
from exporter.export.torch_to_onnx import EXPORTER, torchscript_export, torchscript_export_bytes
from exporter.validate import sessions

logger = logging.getLogger(__name__)


class StartedExport:
    """An export whose file is being written (`data`: its bytes) or, for a model needing external data,
    already written (`data` None). `checked()` must follow: it waits for the write."""

    def __init__(self, path: Path, data: bytes | None) -> None:
        self.path = path
        self.data = data
        self._saving = BackgroundSave(data, path) if data is not None else None

    @contextlib.contextmanager
    def checked(self) -> Iterator[Any]:
        """The check session on the export (ONNX Runtime CPU, graph optimizations off: `check_session`'s),
        built from the bytes while the file is written. On leaving the block the file is complete (a failed
        write raises here, and leaves no file at `path`) and, inside `sessions.shared()`, is the session
        `check_session(path)` returns. An error in the block is raised once the write has ended."""
        saving, data = self._saving, self.data
        if saving is None or data is None:
            yield sessions.check_session(self.path)
            return
        try:
            session = sessions.session_from_bytes(data)
            yield session
        except BaseException:
            saving.join()  # no thread left writing; the block's error is the one raised
            raise
        saving.wait()
        sessions.adopt(self.path, session)


def start_export(
    module: nn.Module,
    args: tuple[torch.Tensor, ...],
    path: Path,
    input_names: list[str],
    output_names: list[str],
    dynamic_axes: dict[str, dict[int, str]],
    opset: int,
) -> StartedExport:
    """`torchscript_export(module, ...)` with the file written by a thread where it fits in one file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = torchscript_export_bytes(module, args, input_names, output_names, dynamic_axes, opset)
    if data is None:
        torchscript_export(module, args, path, input_names, output_names, dynamic_axes, opset)
    logger.info(
        "exported %s (opset %d, %s, %s)", path, opset, EXPORTER, "in memory" if data else "external data"
    )
    return StartedExport(path, data)
