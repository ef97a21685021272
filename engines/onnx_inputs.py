"""Input and output specs read from an ONNX file, without a session (profiles are decided before any
backend; OpenVINO's dynamic dimensions carry no names, the file's do)."""

from __future__ import annotations

import mmap
from collections.abc import Iterator
from pathlib import Path

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


# protobuf field numbers (onnx.proto): ModelProto.graph; GraphProto.initializer/input/output; TensorProto.name
_MODEL_GRAPH, _GRAPH_INITIALIZER, _GRAPH_INPUT, _GRAPH_OUTPUT, _TENSOR_NAME = 7, 5, 11, 12, 8


def read_io(path: str | Path) -> onnx.ModelProto:
    """The file's graph inputs and outputs, and its initializers' names (no values): what
    `onnx_input_specs` / `onnx_output_specs` read, without parsing the weights. A 221 MB decoder with its
    weights inside took ~0.3 s to `onnx.load` only to read its I/O; this walks the protobuf fields and skips
    every other one by its length (memory-mapped: the weights are not even read). A malformed file raises
    ValueError or IndexError."""
    model = onnx.ModelProto()
    with open(path, "rb") as file:
        if file.seek(0, 2) == 0:
            return model  # as onnx.load reads an empty file: an empty model
        with mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            buf = memoryview(mapped)
            try:
                for field, start, end in _fields(buf, 0, len(buf)):
                    if field != _MODEL_GRAPH:
                        continue
                    for inner, begin, stop in _fields(buf, start, end):
                        if inner == _GRAPH_INPUT:
                            model.graph.input.add().ParseFromString(bytes(buf[begin:stop]))
                        elif inner == _GRAPH_OUTPUT:
                            model.graph.output.add().ParseFromString(bytes(buf[begin:stop]))
                        elif inner == _GRAPH_INITIALIZER:
                            name = next(
                                (
                                    bytes(buf[a:b])
                                    for f, a, b in _fields(buf, begin, stop)
                                    if f == _TENSOR_NAME
                                ),
                                b"",
                            )
                            model.graph.initializer.add().name = name.decode()
            finally:
                buf.release()
    return model


def _fields(buf: memoryview, pos: int, end: int) -> Iterator[tuple[int, int, int]]:
    """(field number, start, end) of each length-delimited field of the message in buf[pos:end]; other wire
    types are skipped. A malformed message raises ValueError."""
    while pos < end:
        tag, pos = _varint(buf, pos)
        wire = tag & 7
        if wire == 2:
            length, pos = _varint(buf, pos)
            if pos + length > end:
                raise ValueError("truncated protobuf field")
            yield tag >> 3, pos, pos + length
            pos += length
        elif wire == 0:
            _, pos = _varint(buf, pos)
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
    if pos != end:
        raise ValueError("truncated protobuf message")


def _varint(buf: memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7
