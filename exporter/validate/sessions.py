"""ONNX Runtime sessions for the export's checks, one shared while a stage checks the same file twice.

A check runs a file on ONNX Runtime's CPU provider with its graph optimizations off (they cannot hide a
bug of ours), or with its defaults where a file is judged as deployed (`optimized`). The decoder's export
built two such sessions for `model.exported.onnx` with the same options: its own validation
(exporter/export/decoder_with_past.py) and the export stage's check on the validation feeds; each is ~0.4 s
for the 45M-parameter Llama's 221 MB graph. Inside `shared()`, `check_session` returns the last session it
built when the same file (path, size, modification time) is asked for with the same options, else builds
a new one and keeps that one only: at most one session is held beyond its use, and none after the block.
Outside `shared()` every call builds a new session, as before. The session is the same object, so the
numbers a check reads are the ones a fresh session gives (same file, same options, same inputs). A session
built from a file's bytes while they were written (`session_from_bytes`: the export made in memory,
exporter/export/in_memory.py) is handed over with `adopt` once the file is complete: the last session for
that file, as if `check_session` had built it from the file, so the stage's check builds none.

Building a session is mostly one core's work (reading and optimizing the graph) that releases the GIL, and the
INT8 stage's tail (its target fusion and saves: one core of Python) and its checks (numpy on one core, greedy
decode steps at batch 1) leave the second core of a 2-core machine mostly idle. Inside `background()`,
`prefetch(path, optimized)` builds that session on one background thread as soon as the file is final, and the
next `check_session` for the same file and options takes it (once): the session it would have built (same
file, same graph optimizations, same threads: the same outputs), built earlier, whose idle threads sleep rather
than spin (`_session`). The same thread runs other work handed to `submit` (opening the CPU engine's candidates),
in order. Measured on the 45M Llama INT8 export (tools/bench_export.py's model, Intel Xeon Sapphire Rapids with
AMX, 2 cores, /tmp/s24t/runs2.py): wall time after `quantize()` returns, main 8.9-9.5 s (4 runs), with the
prefetch, the candidates opened early and the pre-build check beside them 7.3-8.6 s (4 runs)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")
Key = tuple[str, bool, int, int]

# (resolved path, optimized, size, mtime_ns) -> session, at most one entry; None outside `shared()`
_last: dict[Key, Any] | None = None
# inside `background()`: its one thread, and the sessions prefetched on it (key -> future), each taken once
_pool: ThreadPoolExecutor | None = None
_prefetched: dict[Key, Future[Any]] = {}
# inside `as_deployed(threads)`: the threads of the CPU engine's ONNX Runtime runners; None outside it
_deployed_threads: int | None = None


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


@contextlib.contextmanager
def background() -> Iterator[None]:
    """Within the block, `prefetch` and `submit` run on one background thread (in the order asked); outside
    it, `prefetch` does nothing and `submit` runs its work at once. At the block's end, work not started is
    dropped, the running one is waited for, and sessions nobody took are released."""
    global _pool
    if _pool is not None:  # nested: the outer block's thread
        yield
        return
    _pool = ThreadPoolExecutor(1, thread_name_prefix="prefetch")
    try:
        yield
    finally:
        pool, _pool = _pool, None
        pool.shutdown(wait=True, cancel_futures=True)
        _prefetched.clear()


@contextlib.contextmanager
def as_deployed(threads: int) -> Iterator[None]:
    """Within the block, a check of a file as deployed (`optimized`) runs the session the CPU engine's ONNX
    Runtime runner of that file runs (engines/onnxruntime_runner.py `deployed_session`: `threads`, idle threads
    sleeping, the runner's optimizations), so the check judges exactly what is deployed and, inside that
    module's `shared_sessions()`, the runner opened later for the same file takes the same session instead of
    building another (the 45M Llama's model.onnx and CPU INT8 file: one build each, not two)."""
    global _deployed_threads
    outer, _deployed_threads = _deployed_threads, threads
    try:
        yield
    finally:
        _deployed_threads = outer


def submit(work: Callable[[], T]) -> Future[T]:
    """`work` on the background thread after what was handed to it before (at once outside `background()`)."""
    if _pool is not None:
        return _pool.submit(work)
    done: Future[T] = Future()
    try:
        done.set_result(work())
    except Exception as exc:
        done.set_exception(exc)
    return done


def prefetch(path: str | Path, optimized: bool = False) -> None:
    """Inside `background()`: build `check_session(path, optimized)` now on the background thread (`path` must
    be final: a file changed after this gets a new session, as its key differs)."""
    if _pool is None:
        return
    key = _key(path, optimized)
    if key not in _prefetched:
        _prefetched[key] = _pool.submit(_session, str(path), optimized, True)


def check_session(path: str | Path, optimized: bool = False) -> Any:
    """An ONNX Runtime CPU session on `path`: graph optimizations off, or its defaults when `optimized`."""
    key = _key(path, optimized)
    if _last is not None and key in _last:
        return _last[key]
    pending = _prefetched.pop(key, None)
    session = pending.result() if pending is not None else _session(str(path), optimized)
    _keep(key, session)
    return session


def session_from_bytes(data: bytes, optimized: bool = False) -> Any:
    """`check_session`'s session built from a file's bytes (a model with no external data): ONNX Runtime
    builds it outside the GIL, so while another thread writes those bytes to disk. Same model bytes, same
    options: the same session (and outputs) as one built from the file."""
    return _session(data, optimized)


def adopt(path: str | Path, session: Any, optimized: bool = False) -> None:
    """Inside `shared()`: `session`, built by `session_from_bytes` from the bytes now complete at `path`, is
    the last session for that file and options (`check_session` returns it, as if built from the file; a
    file changed later gets a new one, as its key differs). Outside `shared()` nothing is kept."""
    _keep(_key(path, optimized), session)


def _key(path: str | Path, optimized: bool) -> Key:
    stat = os.stat(path)
    return (str(Path(path).resolve()), optimized, stat.st_size, stat.st_mtime_ns)


def _keep(key: Key, session: Any) -> None:
    if _last is not None:
        _last.clear()  # only the last one is kept
        _last[key] = session


def _session(model: str | bytes, optimized: bool, prefetched: bool = False) -> Any:
    import onnxruntime as ort

    if optimized and _deployed_threads is not None and isinstance(model, str):
        from engines.onnxruntime_runner import deployed_session

        return deployed_session(model, _deployed_threads, spinning=False)

    options = ort.SessionOptions()
    if not optimized:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if prefetched:
        # a prefetched session's checks run while the background thread still works (the CPU engine's
        # compiles): its idle threads sleep instead of spinning, so they do not burn the core that work needs.
        # The outputs are the same (the same kernels on the same threads). Sessions built on demand keep
        # spinning: the export's unoptimized checks (thousands of small ops) measured slower without it.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
