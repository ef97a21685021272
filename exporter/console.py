"""What `export-engine` shows on the console, and what only goes to OUT_DIR/export.log.

Console (stderr), by default: a line when the export starts, one line per finished stage (with tqdm bars
for long loops on a terminal, exporter/progress.py), then a short summary on stdout. Our own warnings show;
our detail (every pass's counts, each decision) shows with `-v`; `--quiet` shows only errors; `--json`
prints the report on stdout and only warnings and errors on stderr. Libraries' logs (onnx-ir,
onnxscript, ONNX Runtime and its quantizer, torch.onnx, transformers) and Python warnings never reach the
console: they go to export.log with our detail (exporter/logfile.py). A stack trace reaches the console
only with `--debug`.

All of it is Python logging: one console handler with a filter that lets through our loggers only
(at the level the flags ask), redirected around the bars by tqdm's `logging_redirect_tqdm`.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from exporter import progress

OURS = ("exporter", "engines", "graph_passes", "calibration_data", "export_errors")


class _ConsoleFilter(logging.Filter):
    """Our records at `level` and above, stage lines at `stage_level` and above; nothing of libraries."""

    def __init__(self, level: int, stage_level: int) -> None:
        super().__init__()
        self.level = level
        self.stage_level = stage_level

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == progress.STAGE_LOGGER:
            return record.levelno >= self.stage_level
        ours = record.name.split(".", 1)[0] in OURS
        return ours and record.levelno >= self.level


class _Formatter(logging.Formatter):
    """Stage lines as they are, warnings and errors prefixed so they stand out, detail indented."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.name == progress.STAGE_LOGGER:
            return f"  {message}"
        if record.levelno >= logging.WARNING:
            return f"export-engine: {record.levelname.lower()}: {message}"
        return f"    {message}"


def levels(verbose: bool, quiet: bool, json_out: bool, debug: bool) -> tuple[int, int]:
    """(our records' level, stage lines' level) on the console for these flags."""
    if quiet:
        return logging.ERROR, logging.ERROR
    if json_out:
        return logging.WARNING, logging.WARNING
    if debug:
        return logging.DEBUG, logging.INFO
    return (logging.INFO if verbose else logging.WARNING), logging.INFO


@contextmanager
def console(verbose: bool, quiet: bool, json_out: bool, debug: bool) -> Iterator[None]:
    """Route logging for one CLI run: our lines to stderr (around tqdm bars), libraries to the log file
    only, Python warnings into logging. Restores the previous logging set-up afterwards."""
    root = logging.getLogger()
    saved = (root.level, list(root.handlers), logging.getLogger("py.warnings").propagate)
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_ConsoleFilter(*levels(verbose, quiet, json_out, debug)))
    handler.setFormatter(_Formatter())
    root.handlers = [handler]
    root.setLevel(logging.INFO)  # libraries' INFO reaches export.log; the console filter drops it
    logging.captureWarnings(True)  # warnings.warn(...) of libraries -> "py.warnings" -> export.log only
    progress.set_bars(False if quiet or json_out else None)
    from tqdm.contrib.logging import logging_redirect_tqdm

    try:
        with logging_redirect_tqdm():
            yield
    finally:
        logging.captureWarnings(False)
        progress.set_bars(None)
        root.setLevel(saved[0])
        root.handlers = saved[1]


def summary(report: dict[str, Any], output_dir: str, artifacts: list[str]) -> list[str]:
    """The lines printed after a successful export: the stage table, the chosen engine, the files, and
    the next commands to try."""
    lines = []
    timings = report.get("timings_s", {})
    total = sum(timings.values())
    lines.append(f"done in {total:.1f} s: {output_dir}")
    table = [line for line in report.get("stages_md", "").splitlines() if line.startswith("|")]
    lines.extend(table)
    engine = report.get("engine", {})
    cpu = engine.get("cpu")
    if isinstance(cpu, dict) and cpu.get("candidate"):
        lines.append(f"engine: {cpu['candidate']} on {cpu['file']}: {cpu['reason']}")
    elif engine.get("tensorrt_build"):
        lines.append(f"engine: TensorRT, model.plan built from {engine.get('tensorrt_onnx')}")
    lines.append(f"files: {', '.join(artifacts)} (+ report.md, report.json, export.log)")
    lines.append(f"next: engine-bench {output_dir}")
    lines.append(
        f"      python -c \"import exporter; m = exporter.load('{output_dir}'); print(m.task.name)\""
    )
    return lines
