"""OUT_DIR/export.log: everything logged during an export (ours and every library's), with timestamps.

The handler sits on the root logger for the run, so it holds what the logging levels let through: the
CLI sets the root to INFO (our per-pass detail, onnx-ir's, ONNX Runtime quantizer's, transformers', and
Python warnings through `logging.captureWarnings`); a Python caller's own logging set-up decides for its
runs. The file is written into the staged folder, so it lands in OUT_DIR with the export. An export that
fails a check or hits an internal error leaves OUT_DIR as it was, so its log (with the traceback) is copied
to the temp folder and its path put on the exception (`log_path`) for the CLI to name (bad input needs no
log: its one-line message names the file, tensor or flag).
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from export_errors import InputError

LOG_FILE = "export.log"
FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


@contextmanager
def export_log(work: Path) -> Iterator[Path]:
    """Log the run into `work/export.log`; on an exception, keep a copy and name it on the exception."""
    path = work / LOG_FILE
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setLevel(logging.DEBUG)
    handler.setFormatter(logging.Formatter(FORMAT))
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield path
    except BaseException as exc:
        record = logging.LogRecord(__name__, logging.ERROR, __file__, 0, "export failed", None, _info(exc))
        handler.handle(record)  # the traceback goes to the file only, never to a console handler
        handler.close()
        if isinstance(exc, InputError):  # the one-line message says all there is to fix
            raise
        kept = Path(tempfile.mkdtemp(prefix="export-engine-")) / LOG_FILE
        shutil.copyfile(path, kept)
        with contextlib.suppress(AttributeError):  # a built-in exception type without a __dict__
            exc.log_path = kept  # type: ignore[attr-defined]
        raise
    finally:
        root.removeHandler(handler)
        handler.close()


def _info(exc: BaseException):  # type: ignore[no-untyped-def]
    return (type(exc), exc, exc.__traceback__)
