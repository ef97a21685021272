"""ONNX Runtime runner: the CPU fallback, and CUDA/TensorRT providers when onnxruntime-gpu has them.

Nothing is loaded before `__enter__`: constructing a runner for a missing file does not fail,
entering it does (with an `InputError` naming the file), as in Polygraphy's runners.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import weakref
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from engines.base import Runner, TensorSpec
from export_errors import BackendUnavailableError, InputError

logger = logging.getLogger(__name__)

OPTIMIZATION_LEVELS = ("disable", "basic", "extended", "all")
# ONNX Runtime fusions that measured slower on this CPU: SkipLayerNormalization ran 0.86-0.94x the
# speed of Add + LayerNormalization on all-MiniLM-L6-v2 (1x128 and 8x128, 2 threads). See README.
DISABLED_OPTIMIZERS: tuple[str, ...] = ("SkipLayerNormFusion",)

# ONNX Runtime's type strings (NodeArg.type) -> numpy dtypes.
_ORT_DTYPES: dict[str, np.dtype] = {
    f"tensor({name})": np.dtype(np_name)
    for name, np_name in {
        "float": "float32",
        "float16": "float16",
        "double": "float64",
        "int8": "int8",
        "uint8": "uint8",
        "int16": "int16",
        "uint16": "uint16",
        "int32": "int32",
        "uint32": "uint32",
        "int64": "int64",
        "uint64": "uint64",
        "bool": "bool",
    }.items()
}


# inside `shared_sessions()`: (file, options) -> [lock, weak reference to the session]; None outside it
_shared: dict[tuple[Any, ...], list[Any]] | None = None
_shared_lock = threading.Lock()


@contextlib.contextmanager
def shared_sessions() -> Iterator[None]:
    """Within the block, runners of the same file (path, size, modification time) with the same options share
    one InferenceSession while any of them (or a `deployed_session` caller) still holds it: the first to open
    builds it, others wait for it and take it. A session runs from several threads safely, and the same file
    with the same options computes the same outputs. The export opens its CPU INT8 file and model.onnx for its
    checks as deployed and, while those run, again as CPU engine candidates (one build each, not two: the
    45M-parameter Llama's model.onnx is ~0.5 s of one core). The block holds no session itself (weak
    references): a session nobody uses is freed as before, which matters for multi-GB models."""
    global _shared
    outer = _shared
    if outer is None:
        _shared = {}
    try:
        yield
    finally:
        if outer is None:
            _shared = None


def deployed_session(path: str | Path, threads: int | None = None, spinning: bool = True) -> Any:
    """The InferenceSession `OnnxRuntimeRunner(path, threads=threads, spinning=spinning)` runs (the CPU provider,
    the runner's default optimizations), shared inside `shared_sessions()`: for code that runs a file's session
    directly and should run it exactly as the runner deploys it."""
    runner = OnnxRuntimeRunner(path, threads=threads, spinning=spinning)
    with runner:
        return runner._require_session()


def _spec(node_arg: Any) -> TensorSpec:
    if node_arg.type not in _ORT_DTYPES:
        raise InputError(node_arg.name, f"tensor type {node_arg.type} is not supported by this runner")
    shape = tuple(
        dim if isinstance(dim, int) else str(dim if dim is not None else "?") for dim in node_arg.shape
    )
    return TensorSpec(node_arg.name, _ORT_DTYPES[node_arg.type], shape)


class OnnxRuntimeRunner(Runner):
    """Runs an `.onnx` file with ONNX Runtime. Default: the CPU provider, all graph optimizations."""

    backend = "onnxruntime"

    def __init__(
        self,
        path: str | Path,
        *,
        threads: int | None = None,
        providers: Sequence[str] | None = None,
        optimization_level: str = "all",
        spinning: bool = True,
        disabled_optimizers: Sequence[str] = DISABLED_OPTIMIZERS,
    ) -> None:
        """`spinning=False` stops ORT's idle threads from busy-waiting between runs: needed when ORT
        shares the cores with other runners (interleaved benchmarks), where spinning steals their time."""
        super().__init__()
        if optimization_level not in OPTIMIZATION_LEVELS:
            raise InputError(
                "optimization_level", f"{optimization_level!r} is not one of {OPTIMIZATION_LEVELS}"
            )
        if threads is not None and threads < 0:
            raise InputError("threads", f"must be >= 0 (0 = ONNX Runtime's default), got {threads}")
        self.path = Path(path)
        self.threads = threads
        self.providers = list(providers) if providers is not None else ["CPUExecutionProvider"]
        self.optimization_level = optimization_level
        self.spinning = spinning
        self.disabled_optimizers = list(disabled_optimizers)
        self._session: Any = None
        self._inputs: list[TensorSpec] | None = None
        self._outputs: list[TensorSpec] | None = None

    def _session_options(self) -> Any:
        import onnxruntime as ort

        options = ort.SessionOptions()
        levels = {
            "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }
        options.graph_optimization_level = levels[self.optimization_level]
        if self.threads is not None:
            options.intra_op_num_threads = self.threads
        if not self.spinning:
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        return options

    def _activate(self) -> None:
        import onnxruntime as ort

        if not self.path.is_file():
            raise InputError(self.path, "no such ONNX file")
        available = ort.get_available_providers()
        missing = [name for name in self.providers if name not in available]
        if missing:
            raise BackendUnavailableError(
                "providers", f"ONNX Runtime here has no {missing}; available: {available}"
            )
        try:
            self._session = self._shared_or_new()
        except Exception as exc:  # ORT raises its own Fail/InvalidGraph types
            raise InputError(self.path, f"ONNX Runtime cannot load it: {exc}") from exc
        self._inputs = [_spec(arg) for arg in self._session.get_inputs()]
        self._outputs = [_spec(arg) for arg in self._session.get_outputs()]
        logger.info("ONNX Runtime session for %s on %s", self.path, self._session.get_providers())

    def _new_session(self) -> Any:
        import onnxruntime as ort

        return ort.InferenceSession(
            str(self.path),
            sess_options=self._session_options(),
            providers=self.providers,
            disabled_optimizers=self.disabled_optimizers,
        )

    def _shared_or_new(self) -> Any:
        """A new session, or inside `shared_sessions()` the one built for the same file and options."""
        shared = _shared
        if shared is None:
            return self._new_session()
        stat = os.stat(self.path)
        key = (
            str(self.path.resolve()),
            stat.st_size,
            stat.st_mtime_ns,
            self.threads,
            self.spinning,
            self.optimization_level,
            tuple(self.disabled_optimizers),
            tuple(self.providers),
        )
        with _shared_lock:
            entry = shared.setdefault(key, [threading.Lock(), None])
        with entry[0]:
            session = entry[1]() if entry[1] is not None else None
            if session is None:
                session = self._new_session()
                entry[1] = weakref.ref(session)
            return session

    def _deactivate(self) -> None:
        self._session = None

    @property
    def active_providers(self) -> list[str]:
        """The providers the session actually uses (after ORT's own fallback)."""
        return list(self._require_session().get_providers())

    def _require_session(self) -> Any:
        if self._session is None:
            raise RuntimeError(f"{type(self).__name__} is not active: use it as a context manager")
        return self._session

    def _infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        session = self._require_session()
        names = [spec.name for spec in self.output_specs]
        values = session.run(names, dict(feeds))
        return {name: np.asarray(value) for name, value in zip(names, values)}
