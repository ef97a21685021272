"""Trace a decoder layer once per signature and reuse its graph for every later layer of that signature.

Why: TorchScript tracing was ~70% of the streaming export (477 of 693 s at 8B), yet the layers of a
decoder differ only in their weights and, after pruning, in a few widths: every layer with the same
signature (its parameters' names and shapes, the mask it reads, whether it kept attention) traces to the
same graph but for the layer number in its names. So the first layer of a signature is traced with
*marker* weights (seeded random values, distinct per parameter) and each initializer of the traced graph is
matched to the parameter it holds (as is, or transposed: TorchScript folds a Linear weight's transpose for
its MatMul). Every layer of that signature, the first included, then gets the graph with `layers.{i}`
renamed and its own weights written in (`write_piece`). A signature whose graph holds a large initializer
that is no parameter (a constant folded from weights) is not reused: each of its layers is traced.

Each piece written here is still checked on ONNX Runtime against its PyTorch layer on real hidden states
(exporter/export/streaming/stream.py), and tests/test_streaming_export.py checks that the stitched graph
equals the one traced layer by layer.
"""

from __future__ import annotations

import copy
import dataclasses
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn

from exporter.export.decoder_with_past import past_names, present_names
from exporter.export.external_data import ALIGNMENT, MIN_EXTERNAL_TENSOR_BYTES
from exporter.export.streaming.pieces import hidden_name

MAX_CONSTANT_BYTES = 1 << 20  # a larger initializer matching no parameter: the signature is traced per layer


def signature(layer: nn.Module, mask_index: int | None) -> tuple:
    """What decides a layer's traced graph, but for its number: module types, parameter names and shapes."""
    params = tuple((n, tuple(p.shape), str(p.dtype)) for n, p in layer.named_parameters())
    modules = tuple((n, type(m).__name__) for n, m in layer.named_modules())
    return params, modules, mask_index


@dataclasses.dataclass
class Template:
    """A layer's traced graph (no weight bytes) and where each initializer's values come from."""

    index: int  # the layer it was traced at
    input_hidden: str
    graph: onnx.ModelProto  # initializers without data
    sources: dict[str, tuple[str, bool]]  # initializer -> (parameter name in the layer, transposed)
    constants: dict[str, bytes]  # initializer -> raw bytes (the small constants that are no parameter)


def trace_template(
    layer: nn.Module,
    index: int,
    input_hidden: str,
    trace: Callable[[Path], None],
    scratch: Path,
) -> Template | None:
    """Trace `layer` (via `trace(path)`) with marker weights, map the initializers to parameters, restore the
    weights. None when a large initializer is no parameter (then the caller traces each layer)."""
    params = dict(layer.named_parameters())
    saved = {name: p.data for name, p in params.items()}
    markers = {}
    for k, (name, p) in enumerate(params.items()):
        gen = torch.Generator().manual_seed(7919 + k)
        markers[name] = torch.randn(p.shape, generator=gen, dtype=p.dtype)
    path = scratch / f"template{index}.onnx"
    try:
        for name, p in params.items():
            p.data = markers[name]
        trace(path)
    finally:
        for name, p in params.items():
            p.data = saved[name]
    model = onnx.load(str(path), load_external_data=False)
    sources: dict[str, tuple[str, bool]] = {}
    constants: dict[str, bytes] = {}
    by_shape: dict[tuple[int, ...], list[str]] = {}
    for name, marker in markers.items():
        by_shape.setdefault(tuple(marker.shape), []).append(name)
    for tensor in model.graph.initializer:
        value = numpy_helper.to_array(tensor, base_dir=str(scratch))
        found = None
        for name in by_shape.get(tuple(value.shape), []):
            if np.array_equal(markers[name].numpy(), value):
                found = (name, False)
                break
        if found is None and value.ndim == 2:
            for name in by_shape.get(tuple(value.shape[::-1]), []):
                if np.array_equal(markers[name].numpy().T, value):
                    found = (name, True)
                    break
        if found is not None:
            sources[tensor.name] = found
        elif value.nbytes > MAX_CONSTANT_BYTES:
            return None
        else:
            constants[tensor.name] = np.ascontiguousarray(value).tobytes()
        _strip_data(tensor, value)
    for f in scratch.glob(f"template{index}.onnx*"):
        f.unlink()
    return Template(index, input_hidden, model, sources, constants)


def write_piece(template: Template, layer: nn.Module, index: int, input_hidden: str, path: Path) -> None:
    """The template's graph as layer `index` (names renumbered, boundaries renamed) at `path`, with the
    layer's weights (and the template's constants) in `<path>.data`."""
    model = copy.deepcopy(template.graph)
    rename = _renamer(template, index, input_hidden)
    graph = model.graph
    for value in [*graph.input, *graph.output, *graph.value_info]:
        value.name = rename(value.name)
    for node in graph.node:
        node.name = rename(node.name)
        node.input[:] = [rename(n) for n in node.input]
        node.output[:] = [rename(n) for n in node.output]
    params = dict(layer.named_parameters())
    data_name = path.name + ".data"
    with open(path.parent / data_name, "wb") as data:
        for tensor in graph.initializer:
            old = tensor.name
            if old in template.sources:
                name, transposed = template.sources[old]
                value = params[name].detach()
                value = value.T if transposed else value
                payload = value.contiguous().numpy().tobytes()
            else:
                payload = template.constants[old]
            tensor.name = rename(old)
            if (
                len(payload) < MIN_EXTERNAL_TENSOR_BYTES
            ):  # small tensors inline, as the traced pieces keep them
                tensor.raw_data = payload
                continue
            offset = -(-data.tell() // ALIGNMENT) * ALIGNMENT
            data.write(b"\0" * (offset - data.tell()))
            data.write(payload)
            tensor.data_location = onnx.TensorProto.EXTERNAL
            for key, val in (("location", data_name), ("offset", str(offset)), ("length", str(len(payload)))):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, val
    onnx.save_model(model, str(path))


def _strip_data(tensor: onnx.TensorProto, value: np.ndarray) -> None:
    """Keep the initializer's name, type and dims; drop its bytes (written per layer)."""
    dims, dtype, name = list(value.shape), tensor.data_type, tensor.name
    tensor.Clear()
    tensor.name, tensor.data_type = name, dtype
    tensor.dims.extend(dims)


def _renamer(template: Template, index: int, input_hidden: str) -> Callable[[str], str]:
    t = template.index
    exact = {template.input_hidden: input_hidden, hidden_name(t): hidden_name(index)}
    exact.update(zip(past_names(t), past_names(index)))
    exact.update(zip(present_names(t), present_names(index)))
    pattern = re.compile(rf"layers\.{t}(?=[./_]|$)")

    def rename(name: str) -> str:
        if name in exact:
            return exact[name]
        return pattern.sub(f"layers.{index}", name) if t != index else name

    return rename
