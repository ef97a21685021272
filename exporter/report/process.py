"""Process-wide settings an export runs under, set for the export and restored after it.

glibc's malloc gives blocks over its mmap threshold (128 KiB at start, raised as large blocks are freed)
fresh pages from the kernel, and hands the heap's top back once it exceeds the trim threshold (128 KiB):
an export allocates and frees the same large arrays over and over (ONNX Runtime outputs, numpy
temporaries, protobuf buffers), so each batch's arrays page-fault in anew. Measured on the 45M Llama INT8
export (Intel Xeon (Sapphire Rapids, AMX), 2 cores): 4.9M minor faults, ~13 s of system time. Raising the
thresholds keeps freed blocks for reuse. The retained free memory is bounded by the thresholds below, and
an explicit `malloc_trim` (`api._release_freed_memory`) still hands everything free back: it ignores these
thresholds. The API applies them to whole-model exports only: the streamed export (models over
streaming.choose.THRESHOLD_BYTES, the 8B) keeps glibc's defaults and its per-piece trims, so its peak RSS
is what it was (on the 45M Llama forced to stream, these settings raised stage peaks by up to 0.57 GiB). glibc has no getter for these parameters, so "restored"
means glibc's documented defaults (mallopt(3)); its dynamic mmap threshold stays off afterwards (no call
turns it back on), which only makes later large blocks come from mmap as they did at start. A user's own
MALLOC_*_ / GLIBC_TUNABLES settings are left alone. Not glibc (musl, macOS, Windows): nothing is done.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import gc
import os
import platform
import threading
from collections.abc import Iterator
from typing import Any

MIB = 1024**2
# mallopt(3) parameter numbers (malloc.h) and glibc's defaults for them
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
GLIBC_DEFAULTS = {M_TRIM_THRESHOLD: 128 * 1024, M_TOP_PAD: 128 * 1024, M_MMAP_THRESHOLD: 128 * 1024}
# During an export: blocks up to 256 MiB come from the heap and are reused; the heap's free top is kept up
# to 512 MiB, grown 64 MiB at a time. The bound on retained free memory is about these sizes.
EXPORT_SETTINGS = {M_MMAP_THRESHOLD: 256 * MIB, M_TRIM_THRESHOLD: 512 * MIB, M_TOP_PAD: 64 * MIB}
USER_MALLOC_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "GLIBC_TUNABLES")

_lock = threading.Lock()
_depth = 0  # nested / concurrent exports: the outermost one sets and restores
_gc_depth = 0


def _glibc() -> Any | None:
    """libc with `mallopt`, when it is glibc and the user has not tuned malloc through the environment."""
    if platform.libc_ver()[0] != "glibc" or any(os.environ.get(name) for name in USER_MALLOC_ENV):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") else None


def _set(libc: Any, settings: dict[int, int]) -> None:
    for param, value in settings.items():
        libc.mallopt(ctypes.c_int(param), ctypes.c_int(value))


@contextlib.contextmanager
def malloc_for_export(libc: Any | None = None) -> Iterator[None]:
    """Raise glibc's malloc thresholds (`EXPORT_SETTINGS`) for the block; glibc's defaults after it."""
    global _depth
    with _lock:
        _depth += 1
        outermost = _depth == 1
        libc = (libc or _glibc()) if outermost else None
        if libc is not None:
            _set(libc, EXPORT_SETTINGS)
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if libc is not None:
                _set(libc, GLIBC_DEFAULTS)


# Python's cyclic GC during an export: a young collection every 700 allocations walks the young objects,
# and a full one re-walks every tracked object alive (the onnx / onnx-ir graphs hold millions of them; a
# full collection is rarer but long). Objects alive when the export starts (modules, torch, the caller's
# data) are frozen out of the walk (gc.freeze) and the young threshold is raised, so collections come less
# often; garbage cycles are still collected (only later). Both are put back afterwards.
GC_EXPORT_THRESHOLD = (50_000, 20, 20)


@contextlib.contextmanager
def gc_for_export() -> Iterator[None]:
    """Raise the GC thresholds and freeze what is alive for the block; the caller's GC state after it."""
    global _gc_depth
    with _lock:
        _gc_depth += 1
        outermost = _gc_depth == 1
        saved = gc.get_threshold()
        freeze = outermost and gc.get_freeze_count() == 0  # a caller's own frozen objects stay theirs
        if outermost:
            gc.set_threshold(*GC_EXPORT_THRESHOLD)
            if freeze:
                gc.freeze()
    try:
        yield
    finally:
        with _lock:
            _gc_depth -= 1
            if outermost:
                gc.set_threshold(*saved)
                if freeze:
                    gc.unfreeze()


def collect_between_stages() -> None:
    """Under `gc_for_export`, collect the finished stage's garbage cycles (onnx-ir graphs hold their arrays
    in cycles) before the next stage starts: the raised thresholds would carry them into its peak."""
    if _gc_depth:
        gc.collect()
