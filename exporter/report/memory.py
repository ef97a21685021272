"""Peak resident memory per stage, for the report: the kernel's high-water mark, reset at each stage start.

Linux keeps a process's peak RSS (VmHWM in /proc/self/status); writing "5" to /proc/self/clear_refs resets
it to the current RSS, so the mark read at a stage's end is that stage's peak. File-backed pages count
(ONNX Runtime and onnx-ir map external data). Elsewhere (no /proc), nothing is recorded.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

GIB = 1024**3


def reset_peak() -> None:
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def peak_gib() -> float | None:
    """The peak RSS since the last `reset_peak`, in GiB (None where /proc is not available)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) * 1024 / GIB, 3)
    except OSError:
        return None
    return None
