"""Input and output specs read from an ONNX file, without a session (profiles are decided before any
backend; OpenVINO's dynamic dimensions carry no names, the file's do)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from engines.base import TensorSpec


def onnx_input_specs(model: onnx.ModelProto) -> list[TensorSpec]:
    """The graph's real inputs (initializers listed as inputs excluded); dynamic dims as their names."""
    initializers = {init.name for init in model.graph.initializer}
    return [_spec(value) for value in model.graph.input if value.name not in initializers]


def onnx_output_specs(model: onnx.ModelProto) -> list[TensorSpec]:
    """The graph's outputs, as `onnx_input_specs` reads inputs."""
    return [_spec(value) for value in model.graph.output]


def _spec(value: onnx.ValueInfoProto) -> TensorSpec:
    tensor_type = value.type.tensor_type
    dims: list[int | str] = []
    for axis, dim in enumerate(tensor_type.shape.dim):
        if dim.HasField("dim_value"):
            dims.append(dim.dim_value)
        else:
            dims.append(dim.dim_param or f"{value.name}_dim{axis}")
    dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tensor_type.elem_type))
    return TensorSpec(value.name, dtype, tuple(dims))
