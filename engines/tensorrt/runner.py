"""TensorRT runner: a serialized engine (`.plan`), device buffers from torch.cuda, one CUDA stream.

Nothing is touched before `__enter__`. Entering checks the engine's metadata JSON against this
machine (TensorRT release, GPU) and refuses a foreign engine with a clear message, then
deserializes it. `infer` copies feeds to the device on the runner's stream, runs
`execute_async_v3` on it, and copies outputs back as numpy arrays. A feed outside the engine's
optimization profile is refused with the profile's bounds.

torch.cuda provides the buffers and the stream because torch is already a dependency; TensorRT
only sees raw device pointers (`set_tensor_address`). Written against tensorrt-stubs; not run
on a GPU from this repository's machines (README, "On an NVIDIA GPU").
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from engines.base import Runner, TensorSpec
from engines.selection import tensorrt_skip_reason
from engines.tensorrt.metadata import check_engine_compat, read_metadata
from export_errors import BackendUnavailableError, InputError

if TYPE_CHECKING:
    import tensorrt


def _dims(dims: tensorrt.Dims) -> tuple[int, ...]:
    """TensorRT `Dims` -> a tuple (Dims indexes but is not typed as iterable)."""
    return tuple(int(dims[i]) for i in range(len(dims)))


def _torch_dtype(dtype: np.dtype) -> Any:
    import torch

    return torch.from_numpy(np.empty(0, dtype=dtype)).dtype


class TensorRTRunner(Runner):
    """Runs a TensorRT `.plan` built by `engines.tensorrt.builder.build_engine` (profile 0)."""

    backend = "tensorrt"

    def __init__(self, plan_path: str | Path, *, check_compat: bool = True) -> None:
        super().__init__()
        self.plan_path = Path(plan_path)
        self.check_compat = check_compat
        self._runtime: tensorrt.Runtime | None = None
        self._engine: tensorrt.ICudaEngine | None = None
        self._context: tensorrt.IExecutionContext | None = None
        self._stream: Any = None
        self._inputs: list[TensorSpec] | None = None
        self._outputs: list[TensorSpec] | None = None
        self._profile: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {}

    def _activate(self) -> None:
        reason = tensorrt_skip_reason()
        if reason is not None:
            raise BackendUnavailableError("tensorrt", reason)
        import tensorrt as trt
        import torch

        from engines.tensorrt.builder import current_gpu

        if not self.plan_path.is_file():
            raise InputError(self.plan_path, "no such engine file")
        if self.check_compat:
            check_engine_compat(
                read_metadata(self.plan_path), str(trt.__version__), current_gpu(), self.plan_path
            )
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        engine = runtime.deserialize_cuda_engine(self.plan_path.read_bytes())
        if engine is None:
            raise InputError(self.plan_path, "TensorRT could not deserialize this engine (see its log above)")
        self._runtime, self._engine = runtime, engine
        self._context = engine.create_execution_context()
        self._stream = torch.cuda.Stream()
        self._read_specs(engine)

    def _read_specs(self, engine: tensorrt.ICudaEngine) -> None:
        import tensorrt as trt

        inputs, outputs = [], []
        for index in range(engine.num_io_tensors):
            name = engine.get_tensor_name(index)
            dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(name)))
            dims = _dims(engine.get_tensor_shape(name))
            shape = tuple(d if d >= 0 else f"{name}_dim{axis}" for axis, d in enumerate(dims))
            spec = TensorSpec(name, dtype, shape)
            if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
                inputs.append(spec)
                lo, _opt, hi = engine.get_tensor_profile_shape(name, 0)
                self._profile[name] = (_dims(lo), _dims(hi))
            else:
                outputs.append(spec)
        self._inputs, self._outputs = inputs, outputs

    def _deactivate(self) -> None:
        self._context = None  # the context before the engine before the runtime
        self._engine = None
        self._runtime = None
        self._stream = None

    def validate_feeds(self, feeds: Mapping[str, np.ndarray]) -> None:
        super().validate_feeds(feeds)
        for name, (lo, hi) in self._profile.items():
            shape = tuple(feeds[name].shape)
            if not all(a <= d <= b for a, d, b in zip(lo, shape, hi)):
                raise InputError(
                    "feeds",
                    f"input {name!r} has shape {shape}, outside the engine's profile: min {lo}, max {hi}",
                )

    def _infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        context = self._context
        if context is None:
            raise RuntimeError(f"{type(self).__name__} is not active: use it as a context manager")
        keep: list[torch.Tensor] = []  # device buffers live until the stream is synchronized
        with torch.cuda.stream(self._stream):
            for spec in self.input_specs:
                device = torch.from_numpy(np.ascontiguousarray(feeds[spec.name])).to("cuda")
                context.set_input_shape(spec.name, tuple(device.shape))
                context.set_tensor_address(spec.name, device.data_ptr())
                keep.append(device)
            outputs: dict[str, torch.Tensor] = {}
            for spec in self.output_specs:
                shape = _dims(context.get_tensor_shape(spec.name))
                if any(d < 0 for d in shape):
                    raise InputError(
                        spec.name, f"data-dependent output shape {shape} is not supported by this runner"
                    )
                outputs[spec.name] = torch.empty(shape, dtype=_torch_dtype(spec.dtype), device="cuda")
                context.set_tensor_address(spec.name, outputs[spec.name].data_ptr())
            if not context.execute_async_v3(self._stream.cuda_stream):
                raise RuntimeError(f"{self.plan_path}: TensorRT execute_async_v3 failed (see its log above)")
            host = {name: tensor.cpu().numpy() for name, tensor in outputs.items()}
        self._stream.synchronize()
        return host
