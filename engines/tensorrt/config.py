"""What TensorRT is asked to build, decided by pure code: flags per major version, sparsity, precision.

TensorRT 10 still has the weak-typing precision flags (INT8, FP16; deprecated) and offers the
STRONGLY_TYPED network flag. TensorRT 11 removed weak typing: no INT8/FP16 builder flags, no
calibrators, every network strongly typed, so a plain fp32 ONNX silently builds an fp32 engine
and FP16 must be written into the graph (graph_passes/convert_fp16.py). We build strongly typed
on both by default, so one ONNX gives the same engine precision on 10 and 11; on TensorRT 10
`strongly_typed=False` keeps the legacy flags for graphs that want TensorRT to pick precisions.

With strong typing, precision comes from the graph: Q/DQ pairs give INT8 layers, FP16 tensors
give FP16 layers. Setting a precision flag on a strongly typed network is an error in TensorRT,
so those flags appear only on the weakly typed TensorRT 10 path.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import onnx

from engines.tensorrt.profiles import OptimizationProfile
from export_errors import InputError

# The 2:4 sparsity tags written by the graph pass that checks weights (one place for the names).
SPARSITY_NODE_KEY = "sparsity_2to4"  # node metadata_props: key -> SPARSITY_NODE_VALUE
SPARSITY_NODE_VALUE = "eligible"
SPARSITY_COUNT_KEY = "sparsity_2to4_count"  # model metadata_props: how many weights were tagged

SUPPORTED_TRT_MAJORS = (10, 11)
QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")


@dataclasses.dataclass(frozen=True)
class TensorRTBuildConfig:
    """Everything `build_engine` needs besides the paths.

    fp16: run the non-quantized rest in FP16. Strongly typed: the graph must carry it
    (`fp16_in_graph`, set after graph_passes.convert_fp16 ran; `build_engine` runs the pass
    when needed). Weakly typed (TensorRT 10 only): the FP16 builder flag.
    sparse_weights: None = decide from the 2:4 tags in the ONNX.
    """

    profiles: tuple[OptimizationProfile, ...] = ()
    timing_cache: Path | None = None
    sparse_weights: bool | None = None
    fp16: bool = True
    fp16_in_graph: bool = False
    strongly_typed: bool = True
    workspace_bytes: int | None = None
    qdq_in_graph: bool = False  # filled by build_engine from the graph

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["profiles"] = [p.to_json() for p in self.profiles]
        data["timing_cache"] = str(self.timing_cache) if self.timing_cache else None
        return data


def _check_major(trt_major: int) -> None:
    if trt_major not in SUPPORTED_TRT_MAJORS:
        raise InputError(
            "tensorrt", f"TensorRT {trt_major}.x is not supported; supported: {SUPPORTED_TRT_MAJORS}"
        )


def network_flags_for(trt_major: int, config: TensorRTBuildConfig) -> list[str]:
    """Names of `tensorrt.NetworkDefinitionCreationFlag` members to set."""
    _check_major(trt_major)
    if trt_major >= 11 and not config.strongly_typed:
        raise InputError("strongly_typed", "TensorRT 11 builds strongly typed networks only")
    return ["STRONGLY_TYPED"] if config.strongly_typed else []


def builder_flags_for(trt_major: int, config: TensorRTBuildConfig) -> list[str]:
    """Names of `tensorrt.BuilderFlag` members to set, for this TensorRT major version."""
    network_flags_for(trt_major, config)  # validates the major version and typing mode
    flags: list[str] = []
    if config.strongly_typed:
        if config.fp16 and not config.fp16_in_graph:
            raise InputError(
                "fp16",
                f"a strongly typed network (TensorRT {trt_major}) takes FP16 from the graph: run "
                "graph_passes.convert_fp16 first and set fp16_in_graph=True"
                + (", or build weakly typed with strongly_typed=False" if trt_major == 10 else ""),
            )
    else:  # TensorRT 10, legacy weak typing: precision flags (deprecated there, removed in 11)
        if config.qdq_in_graph:
            flags.append("INT8")
        if config.fp16:
            flags.append("FP16")
    if config.sparse_weights:
        flags.append("SPARSE_WEIGHTS")
    return flags


def sparse_tagged_nodes(model: onnx.ModelProto) -> list[str]:
    """Names of the nodes the 2:4 pass tagged as eligible (main graph)."""
    return [
        node.name or node.output[0]
        for node in model.graph.node
        if any(p.key == SPARSITY_NODE_KEY and p.value == SPARSITY_NODE_VALUE for p in node.metadata_props)
    ]


def sparse_weights_enabled(model: onnx.ModelProto) -> bool:
    """True when the graph carries 2:4 tags: on a node, or a positive model-level count."""
    if sparse_tagged_nodes(model):
        return True
    for prop in model.metadata_props:
        if prop.key == SPARSITY_COUNT_KEY:
            try:
                return int(prop.value) > 0
            except ValueError:
                raise InputError(
                    SPARSITY_COUNT_KEY, f"model metadata value {prop.value!r} is not an integer"
                ) from None
    return False


def has_qdq(model: onnx.ModelProto) -> bool:
    return any(node.op_type in QDQ_OPS for node in model.graph.node)


def has_fp16(model: onnx.ModelProto) -> bool:
    """True when the graph computes in FP16 (an FP16 initializer or a Cast to FP16)."""
    fp16 = onnx.TensorProto.FLOAT16
    if any(init.data_type == fp16 for init in model.graph.initializer):
        return True
    return any(
        node.op_type == "Cast" and any(a.name == "to" and a.i == fp16 for a in node.attribute)
        for node in model.graph.node
    )


def precision_label(config: TensorRTBuildConfig) -> str:
    """What the engine computes in: "int8+fp16", "int8", "fp16" or "fp32" (for the metadata and report)."""
    fp16 = config.fp16 and (config.fp16_in_graph or not config.strongly_typed)
    if config.qdq_in_graph:
        return "int8+fp16" if fp16 else "int8"
    return "fp16" if fp16 else "fp32"


def resolve_config(model: onnx.ModelProto, config: TensorRTBuildConfig) -> TensorRTBuildConfig:
    """Fill what the graph decides: Q/DQ present, FP16 already in the graph, sparsity from tags."""
    return dataclasses.replace(
        config,
        qdq_in_graph=has_qdq(model),
        fp16_in_graph=config.fp16_in_graph or has_fp16(model),
        sparse_weights=sparse_weights_enabled(model)
        if config.sparse_weights is None
        else config.sparse_weights,
    )
