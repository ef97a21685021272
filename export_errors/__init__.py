"""Typed errors, on the bottom floor: every package (exporter, engines, graph_passes, calibration_data)
imports them from here without reaching up. The CLIs turn them into one line and an exit code, never a
traceback.

`InputError` (exit 2) is the user's input being wrong: it always names the file (and the tensor
or flag) and the problem. `ValidationError` (exit 1) is our output failing a numeric check:
the export refused to carry on, with the numbers. Anything else is an internal error (exit 1).
"""

from __future__ import annotations

from pathlib import Path


class ExportEngineError(Exception):
    """Base class of every error the tool raises on purpose."""

    exit_code = 1


class InputError(ExportEngineError):
    """Bad input or usage: names the file (or flag) and the problem. Exit code 2."""

    exit_code = 2

    def __init__(self, where: str | Path | None, problem: str) -> None:
        self.where = str(where) if where is not None else None
        self.problem = problem
        super().__init__(f"{self.where}: {problem}" if self.where else problem)


class ValidationError(ExportEngineError):
    """A produced artifact disagrees with its reference beyond tolerance. Exit code 1."""


class BackendUnavailableError(InputError):
    """The requested backend cannot run on this machine (e.g. --backend tensorrt without a GPU)."""
