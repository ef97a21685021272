"""ONNX -> serialized TensorRT engine (`model.plan`) with its metadata JSON.

Everything the build consumes is decided by pure, tested code (`prepare_onnx`: pre-build
checks, precision and sparsity from the graph, the FP16 casts pass, profiles). The TensorRT
part (`build_engine`) is thin: TensorRT's documented Python API (Builder, strongly typed
network, OnnxParser, BuilderConfig, optimization profiles, timing cache, serialize), imported
lazily so that this module imports without TensorRT. It is type-checked against tensorrt-stubs
and has not been run on a GPU from this repository's machines (see README, "On an NVIDIA GPU").

We call TensorRT's API directly rather than Polygraphy's `EngineFromNetwork`: the report needs
the builder's own log lines (sparse layers), which Polygraphy routes into its global logger,
and the direct calls are what mypy checks against the stubs.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import onnx

from engines.onnx_inputs import onnx_input_specs
from engines.selection import tensorrt_skip_reason
from engines.tensorrt.checks import BuildProblem, prebuild_check
from engines.tensorrt.config import (
    SPARSITY_COUNT_KEY,
    SPARSITY_NODE_KEY,
    SPARSITY_NODE_VALUE,
    TensorRTBuildConfig,
    builder_flags_for,
    network_flags_for,
    precision_label,
    resolve_config,
    sparse_weights_enabled,
)
from engines.tensorrt.log import SparsityReport, parse_sparsity_log
from engines.tensorrt.metadata import GpuInfo, check_engine_compat, engine_metadata, write_metadata
from engines.tensorrt.profiles import (
    OptimizationProfile,
    ShapeRange,
    check_profile,
    default_profiles,
    profiles_from_shapes,
)
from export_errors import BackendUnavailableError, ExportEngineError, InputError

if TYPE_CHECKING:
    import tensorrt

logger = logging.getLogger(__name__)

DEFAULT_MAX_BATCH = 32
DEFAULT_MAX_SEQ = 512

__all__ = [
    "DEFAULT_MAX_BATCH",
    "DEFAULT_MAX_SEQ",
    "SPARSITY_COUNT_KEY",
    "SPARSITY_NODE_KEY",
    "SPARSITY_NODE_VALUE",
    "BuildProblem",
    "BuildResult",
    "EngineBuildError",
    "GpuInfo",
    "OptimizationProfile",
    "ShapeRange",
    "TensorRTBuildConfig",
    "build_engine",
    "builder_flags_for",
    "check_engine_compat",
    "default_profiles",
    "engine_metadata",
    "network_flags_for",
    "prebuild_check",
    "prepare_onnx",
    "profiles_from_shapes",
    "sparse_weights_enabled",
]


class EngineBuildError(ExportEngineError):
    """TensorRT parsed or built nothing; the message carries its errors."""


@dataclasses.dataclass
class BuildResult:
    plan_path: Path
    metadata_path: Path
    metadata: dict[str, Any]
    onnx_built: Path  # the ONNX TensorRT parsed (the FP16-cast copy when the pass ran)
    sparsity: SparsityReport
    seconds: float
    warnings: list[str]

    def to_json(self) -> dict[str, Any]:
        return {
            "plan": str(self.plan_path),
            "metadata": str(self.metadata_path),
            "onnx_built": str(self.onnx_built),
            "precision": self.metadata.get("precision"),
            "sparsity": self.sparsity.to_json(),
            "seconds": self.seconds,
            "warnings": self.warnings,
        }


def _problems_message(problems: list[Any], limit: int = 8) -> str:
    shown = "; ".join(str(p) for p in problems[:limit])
    return shown + (f"; and {len(problems) - limit} more" if len(problems) > limit else "")


def _write_fp16_copy(model: onnx.ModelProto, out_path: Path) -> None:
    import onnx_ir as ir

    from graph_passes.convert_fp16 import ConvertFp16Pass

    ir_model = ir.from_proto(model)
    result = ConvertFp16Pass()(ir_model)
    logger.info("FP16 casts for the strongly typed network: %s", getattr(result, "report", None))
    ir.save(ir_model, out_path)


def prepare_onnx(
    onnx_path: str | Path, work_dir: str | Path, config: TensorRTBuildConfig
) -> tuple[Path, TensorRTBuildConfig]:
    """Check the ONNX, resolve the config from the graph, write the FP16-cast copy when needed.

    Returns the ONNX to parse and the resolved config. Raises `InputError` naming the nodes
    TensorRT would reject, or the profile problems. Pure: no TensorRT needed.
    """
    onnx_path, work_dir = Path(onnx_path), Path(work_dir)
    if not onnx_path.is_file():
        raise InputError(onnx_path, "no such ONNX file")
    model = onnx.load(str(onnx_path))
    problems = prebuild_check(model)
    if problems:
        raise InputError(onnx_path, f"TensorRT would reject this graph: {_problems_message(problems)}")
    config = resolve_config(model, config)
    specs = onnx_input_specs(model)
    if not config.profiles and any(not isinstance(d, int) for s in specs for d in s.shape):
        config = dataclasses.replace(
            config, profiles=(default_profiles(specs, DEFAULT_MAX_BATCH, DEFAULT_MAX_SEQ),)
        )
    for profile in config.profiles:
        profile_problems = check_profile(specs, profile)
        if profile_problems:
            raise InputError("--minShapes/--optShapes/--maxShapes", _problems_message(profile_problems))
    if config.strongly_typed and config.fp16 and not config.fp16_in_graph:
        work_dir.mkdir(parents=True, exist_ok=True)
        fp16_path = work_dir / f"{onnx_path.stem}.fp16.onnx"
        _write_fp16_copy(model, fp16_path)
        return fp16_path, dataclasses.replace(config, fp16_in_graph=True)
    return onnx_path, config


def _require_tensorrt() -> None:
    reason = tensorrt_skip_reason()
    if reason is not None:
        raise BackendUnavailableError("tensorrt", reason)


def current_gpu() -> GpuInfo:
    """The GPU torch sees as device 0."""
    import torch

    major, minor = torch.cuda.get_device_capability(0)
    return GpuInfo(torch.cuda.get_device_name(0), f"{major}.{minor}")


def _capturing_logger() -> Any:
    """A TensorRT logger that keeps every message (the sparse layer lines are INFO) and forwards
    warnings and errors to `logging`."""
    import tensorrt as trt

    severity = trt.ILogger.Severity

    class CapturingLogger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.min_severity = severity.INFO
            self.messages: list[str] = []
            self.warnings: list[str] = []

        def log(self, level: trt.ILogger.Severity, msg: str) -> None:
            self.messages.append(msg)
            if level in (severity.INTERNAL_ERROR, severity.ERROR, severity.WARNING):
                logger.warning("TensorRT: %s", msg)
                self.warnings.append(msg)
            else:
                logger.debug("TensorRT: %s", msg)

    return CapturingLogger()


def _network(
    builder: tensorrt.Builder, major: int, config: TensorRTBuildConfig
) -> tensorrt.INetworkDefinition:
    import tensorrt as trt

    bits = 0
    for name in network_flags_for(major, config):
        flag = getattr(trt.NetworkDefinitionCreationFlag, name, None)
        if flag is None:
            if major >= 11:
                continue  # TensorRT 11: strongly typed is the only mode, the flag may be gone
            raise EngineBuildError(f"TensorRT {trt.__version__} has no NetworkDefinitionCreationFlag.{name}")
        bits |= 1 << int(flag)
    return builder.create_network(bits)


def _parse(network: tensorrt.INetworkDefinition, trt_logger: Any, onnx_path: Path) -> tensorrt.OnnxParser:
    import tensorrt as trt

    parser = trt.OnnxParser(network, trt_logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [parser.get_error(i) for i in range(parser.num_errors)]
        details = "; ".join(f"node {e.node_name()!r} ({e.node_operator()}): {e.desc()}" for e in errors)
        raise EngineBuildError(f"{onnx_path}: TensorRT's ONNX parser failed: {details}")
    return parser  # keep alive while the network lives


def _builder_config(
    builder: tensorrt.Builder, major: int, config: TensorRTBuildConfig
) -> tensorrt.IBuilderConfig:
    import tensorrt as trt

    builder_config = builder.create_builder_config()
    for name in builder_flags_for(major, config):
        builder_config.set_flag(getattr(trt.BuilderFlag, name))
    if config.workspace_bytes is not None:
        builder_config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, config.workspace_bytes)
    for profile in config.profiles:
        trt_profile = builder.create_optimization_profile()
        for name, r in profile.shapes.items():
            trt_profile.set_shape(name, trt.Dims(list(r.min)), trt.Dims(list(r.opt)), trt.Dims(list(r.max)))
        builder_config.add_optimization_profile(trt_profile)
    cache_bytes = (
        config.timing_cache.read_bytes() if config.timing_cache and config.timing_cache.is_file() else b""
    )
    cache = builder_config.create_timing_cache(cache_bytes)
    builder_config.set_timing_cache(cache, False)
    return builder_config


def _save_timing_cache(builder_config: tensorrt.IBuilderConfig, path: Path | None) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(bytes(builder_config.get_timing_cache().serialize()))
    tmp.replace(path)


def build_engine(
    onnx_path: str | Path, plan_path: str | Path, config: TensorRTBuildConfig | None = None
) -> BuildResult:
    """Build `plan_path` (and `plan_path`.json) from `onnx_path`. Needs TensorRT and a CUDA GPU."""
    start = time.perf_counter()
    plan_path = Path(plan_path)
    onnx_built, config = prepare_onnx(onnx_path, plan_path.parent, config or TensorRTBuildConfig())
    _require_tensorrt()
    import tensorrt as trt

    major = int(str(trt.__version__).split(".")[0])
    trt_logger = _capturing_logger()
    builder = trt.Builder(trt_logger)
    network = _network(builder, major, config)
    _parser = _parse(network, trt_logger, onnx_built)
    builder_config = _builder_config(builder, major, config)
    serialized = builder.build_serialized_network(network, builder_config)
    if serialized is None:
        raise EngineBuildError(
            f"{onnx_built}: TensorRT built no engine: {_problems_message(trt_logger.warnings)}"
        )
    plan_path.parent.mkdir(parents=True, exist_ok=True)
    plan_path.write_bytes(bytes(serialized))
    _save_timing_cache(builder_config, config.timing_cache)
    metadata = engine_metadata(
        trt_version=str(trt.__version__),
        gpu=current_gpu(),
        profiles=config.profiles,
        precision=precision_label(config),
        strongly_typed=config.strongly_typed,
        sparse_weights=bool(config.sparse_weights),
        onnx_path=onnx_built,
        extra={"builder_flags": builder_flags_for(major, config)},
    )
    sparsity = parse_sparsity_log(trt_logger.messages)
    metadata["sparsity"] = sparsity.to_json()
    metadata_path = write_metadata(plan_path, metadata)
    seconds = time.perf_counter() - start
    logger.info("built %s (%s) in %.1f s", plan_path, metadata["precision"], seconds)
    return BuildResult(plan_path, metadata_path, metadata, onnx_built, sparsity, seconds, trt_logger.warnings)
