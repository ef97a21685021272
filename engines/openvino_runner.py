"""OpenVINO runner: Intel's CPU runtime, which runs a Q/DQ ONNX file with real INT8 kernels.

OpenVINO reads `.onnx` (and its own `.xml` IR) directly (`Core.read_model`); its low-precision
transformations turn each Q/DQ pair into an INT8 layer, where ONNX Runtime's CPU kernels would run
the TensorRT-style s8 x s8 placement as fake quantization. Settings, as measured best on 2 cores
(README "CPU engine"): `PERFORMANCE_HINT=LATENCY` (one stream), `INFERENCE_NUM_THREADS=threads`, and an
explicit `INFERENCE_PRECISION_HINT`: OpenVINO's default on CPUs with AVX512-BF16 or AMX is bf16, so
"f32" is asked for in full unless bf16 is what the caller measured and chose.

Nothing is loaded before `__enter__`, and `openvino` is imported only there: the package is optional
for every other path, and a missing install is a `BackendUnavailableError` naming the remedy.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from engines.base import Runner, TensorSpec
from export_errors import BackendUnavailableError, InputError

logger = logging.getLogger(__name__)

INSTALL_HINT = "pip install openvino (Linux x86_64/aarch64, Windows x86_64, macOS arm64 wheels on PyPI)"
PRECISIONS = ("f32", "bf16")
SUFFIXES = (".onnx", ".xml")


def openvino_unavailable_reason() -> str | None:
    """None when the OpenVINO runtime imports and has a CPU device, else why not (one line)."""
    try:
        import openvino as ov
    except Exception as exc:  # ImportError, or a broken install raising OSError on its libraries
        return f"the openvino module does not import ({type(exc).__name__}: {exc}); {INSTALL_HINT}"
    try:
        devices = ov.Core().available_devices
    except Exception as exc:
        return f"OpenVINO lists no devices ({type(exc).__name__}: {exc})"
    if "CPU" not in devices:
        return f"OpenVINO has no CPU device here (devices: {devices})"
    return None


# Inside `shared_reads()`: (resolved path, size, mtime_ns) -> [lock, the model read once]; None outside.
_reads: dict[tuple[str, int, int], list[Any]] | None = None
_reads_lock = threading.Lock()


@contextlib.contextmanager
def shared_reads() -> Iterator[None]:
    """Within the block, runners of the same file read it once (`Core.read_model`: the ONNX frontend's
    conversion, ~0.35-0.6 s for the 45M Llama's 221 MB graph) and compile each its own copy: the CPU
    plugin compiles a clone of the model it is given, so the read model is shared, never changed. The
    export's bf16 and fp32 candidates both run model.exported.onnx. Nothing is kept after the block."""
    global _reads
    outer = _reads
    if outer is None:
        _reads = {}
    try:
        yield
    finally:
        if outer is None:
            _reads = None


def _read_model(core: Any, path: Path) -> Any:
    """`core.read_model(path)`, once per file inside `shared_reads()` (other threads wait for that read)."""
    reads = _reads
    if reads is None:
        return core.read_model(str(path))
    stat = os.stat(path)
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    with _reads_lock:
        entry = reads.setdefault(key, [threading.Lock(), None])
    with entry[0]:
        if entry[1] is None:
            entry[1] = core.read_model(str(path))
        return entry[1]


class OpenVinoRunner(Runner):
    """Runs an `.onnx` (or OpenVINO `.xml`) file on OpenVINO's CPU plugin."""

    backend = "openvino"

    def __init__(
        self,
        path: str | Path,
        *,
        threads: int | None = None,
        precision: str = "f32",
        properties: Mapping[str, Any] | None = None,
    ) -> None:
        """`precision`: OpenVINO's inference precision hint ("f32" or "bf16"). `properties`: more
        compile properties (they override the defaults above)."""
        super().__init__()
        if precision not in PRECISIONS:
            raise InputError("precision", f"{precision!r} is not one of {PRECISIONS}")
        if threads is not None and threads < 0:
            raise InputError("threads", f"must be >= 0 (0 = OpenVINO's default), got {threads}")
        self.path = Path(path)
        self.threads = threads
        self.precision = precision
        self.properties = dict(properties or {})
        self._request: Any = None
        self._output_names: list[str] = []
        self._inputs: list[TensorSpec] | None = None
        self._outputs: list[TensorSpec] | None = None

    def compile_properties(self) -> dict[str, Any]:
        """What `compile_model` gets: latency hint, threads, precision, then the caller's properties."""
        config: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": self.precision}
        if self.threads:
            config["INFERENCE_NUM_THREADS"] = self.threads
        return config | self.properties

    def _activate(self) -> None:
        if not self.path.is_file():
            raise InputError(self.path, "no such model file")
        if self.path.suffix not in SUFFIXES:
            raise InputError(self.path, f"OpenVINO reads {SUFFIXES} files, not {self.path.suffix!r}")
        reason = openvino_unavailable_reason()
        if reason is not None:
            raise BackendUnavailableError("openvino", reason)
        import openvino as ov

        core = ov.Core()
        try:
            model = _read_model(core, self.path)
            compiled = core.compile_model(model, "CPU", self.compile_properties())
        except Exception as exc:  # OpenVINO raises RuntimeError/OVError with multi-line texts
            first = (str(exc).strip().splitlines() or [""])[0]
            raise InputError(self.path, f"OpenVINO cannot load it: {first}") from exc
        self._request = compiled.create_infer_request()
        self._output_names = [output.get_any_name() for output in compiled.outputs]
        self._inputs, self._outputs = _specs(self.path, compiled)
        logger.info("OpenVINO CPU model for %s (%s)", self.path, self.compile_properties())

    def _deactivate(self) -> None:
        self._request = None

    def _infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self._request is None:
            raise RuntimeError(f"{type(self).__name__} is not active: use it as a context manager")
        self._request.infer({name: np.ascontiguousarray(a) for name, a in feeds.items()}, share_inputs=True)
        # the output tensors are OpenVINO's buffers, overwritten by the next call: copy them out
        return {
            name: np.array(self._request.get_output_tensor(index).data, copy=True)
            for index, name in enumerate(self._output_names)
        }


def _specs(path: Path, compiled: Any) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """I/O specs. OpenVINO's dynamic dimensions carry no names, and names are what ties `attention_mask`'s
    shape to `input_ids`' (engines/bench_inputs.py): for an ONNX file they are read from the file."""
    if path.suffix == ".onnx":
        from engines.onnx_inputs import onnx_input_specs, onnx_output_specs, read_io

        model = read_io(path)  # the I/O only: OpenVINO has read the file already, weights and all
        return onnx_input_specs(model), onnx_output_specs(model)
    return [_ov_spec(port) for port in compiled.inputs], [_ov_spec(port) for port in compiled.outputs]


def _ov_spec(port: Any) -> TensorSpec:
    name = port.get_any_name()
    shape = tuple(
        dim.get_length() if dim.is_static else f"{name}_dim{axis}"
        for axis, dim in enumerate(port.get_partial_shape())
    )
    return TensorSpec(name, np.dtype(port.get_element_type().to_dtype()), shape)
