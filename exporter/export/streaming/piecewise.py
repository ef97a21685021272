"""Rewrite a large ONNX graph one piece at a time with the proto-level quantizers written for whole models.

Why: the INT8/INT4 CPU files are made by functions that take a whole `onnx.ModelProto` (ONNX Runtime's
`quantize_dynamic`, exporter/quantize/embeddings.py, exporter/quantize/int4.py's `cpu_model`). At 8B the
fp32 graph is ~24 GiB and cannot be loaded. Their rewrites are local, though: a MatMul's dynamic INT8 form
reads only its own weight and input; a block-quantized weight only its own columns. So the graph is
loaded with onnx-ir (weights stay on disk, read lazily), each piece (one decoder layer's MatMuls, the LM
head, the embedding Gather) is cut out as a small model (`extract`: its nodes, their initializers read
from disk, every other input a graph input), handed to the whole-model function, and the result put back
in its place (`splice`); the fp32 weights it replaced are unmapped. `save` streams the result to one
64 KiB-aligned data file. Only one piece's fp32 weights and the quantized weights are ever in memory.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
from onnx import helper

from exporter.export.external_data import ALIGNMENT
from graph_passes.pipeline import save_streamed

_LAYER = re.compile(r"/layers\.(\d+)/")


def layer_of(node: ir.Node) -> int | None:
    """The decoder layer a node belongs to, from its name (`/model/model/layers.{i}/...`), else None."""
    match = _LAYER.search(node.name or "")
    return None if match is None else int(match.group(1))


def by_layer(nodes: Iterable[ir.Node]) -> list[list[ir.Node]]:
    """`nodes` grouped by decoder layer and first input (the MatMuls reading one activation: q/k/v, gate/up
    stay together, as quantize_dynamic quantizes that activation once for all of them), in layer order;
    nodes of no layer first, grouped the same way."""
    groups: dict[tuple[int, str], list[ir.Node]] = defaultdict(list)
    for node in nodes:
        layer = layer_of(node)
        source = node.inputs[0].name if node.inputs and node.inputs[0] is not None else ""
        groups[(-1 if layer is None else layer, source or "")].append(node)
    return [groups[key] for key in sorted(groups, key=lambda k: k[0])]


def extract(graph: ir.Graph, nodes: list[ir.Node], folder: Path, name: str, with_data: bool = True) -> Path:
    """The model of `nodes` alone at `folder/name` (weights in `<name>.data`): their initializers as
    initializers, every other input a graph input, every output read elsewhere (or a graph output) an output.
    `with_data` False: initializers of 1 KiB or more keep their dims and type but no bytes (for a caller
    that replaces them from the lazily read original, never reading them from the piece)."""
    inside = set(map(id, nodes))
    produced = {id(v) for n in nodes for v in n.outputs}
    inputs: dict[str, ir.Value] = {}
    inits: dict[str, ir.Value] = {}
    for node in nodes:
        for value in node.inputs:
            if value is None or id(value) in produced or not value.name:
                continue
            if value.is_initializer() and value.const_value is not None:
                inits[value.name] = value
            else:
                inputs[value.name] = value
    outputs = [
        v
        for n in nodes
        for v in n.outputs
        if v.is_graph_output() or any(id(user) not in inside for user, _ in v.uses())
    ]
    data_name = name + ".data"
    tensors = []
    with open(folder / data_name, "wb") as data:
        for value in inits.values():
            const = value.const_value
            assert const is not None
            nbytes = int(np.prod(const.shape.numpy()) * const.dtype.itemsize)
            if not with_data and nbytes >= 1024:
                tensor = onnx.TensorProto()
                tensor.name, tensor.data_type = value.name, const.dtype.value
                tensor.dims.extend(const.shape.numpy())
                tensor.data_location = onnx.TensorProto.EXTERNAL
                for key, val in (("location", "not.written"), ("offset", "0"), ("length", str(nbytes))):
                    entry = tensor.external_data.add()
                    entry.key, entry.value = key, val
                tensors.append(tensor)
                continue
            array = np.ascontiguousarray(const.numpy())
            tensor = onnx.TensorProto()
            tensor.name = value.name
            tensor.data_type = helper.np_dtype_to_tensor_dtype(array.dtype)
            tensor.dims.extend(array.shape)
            if array.nbytes < 1024:
                tensor.raw_data = array.tobytes()
            else:
                offset = -(-data.tell() // ALIGNMENT) * ALIGNMENT
                data.write(b"\0" * (offset - data.tell()))
                array.tofile(data)
                tensor.data_location = onnx.TensorProto.EXTERNAL
                for key, val in (
                    ("location", data_name),
                    ("offset", str(offset)),
                    ("length", str(array.nbytes)),
                ):
                    entry = tensor.external_data.add()
                    entry.key, entry.value = key, val
            tensors.append(tensor)
            del array
    graph_proto = helper.make_graph(
        [ir.serde.serialize_node(n) for n in nodes],
        f"piece_{name}",
        [_value_info(v) for v in inputs.values()],
        [_value_info(v) for v in outputs],
        initializer=tensors,
    )
    opsets = [helper.make_opsetid(domain, version) for domain, version in graph.opset_imports.items()]
    model = helper.make_model(graph_proto, opset_imports=opsets)
    model.ir_version = 8
    path = folder / name
    onnx.save_model(model, str(path))
    return path


def splice(model: ir.Model, nodes: list[ir.Node], piece: onnx.ModelProto) -> None:
    """Put `piece` (the rewritten model of `nodes`, same input and output names) in place of `nodes`."""
    graph = model.graph
    new = ir.from_proto(piece)
    new_graph = new.graph
    outer: dict[str, ir.Value] = {}
    for node in nodes:
        for value in node.inputs:
            if value is not None and value.name:
                outer.setdefault(value.name, value)
    old_outputs = {v.name: v for n in nodes for v in n.outputs if v.name}
    removed = set(map(id, nodes))
    new_nodes = list(new_graph)
    new_inputs = {v.name: v for v in new_graph.inputs}
    new_inits = dict(new_graph.initializers)
    new_graph.remove(new_nodes)
    moved: dict[str, ir.Value] = {}
    for node in new_nodes:
        for i, value in enumerate(node.inputs):
            if value is None or not value.name:
                continue
            if value.name in new_inits and new_inits[value.name] is value:
                node.replace_input_with(i, _moved_initializer(graph, value, new_graph, moved, removed))
            elif value.name in new_inputs and new_inputs[value.name] is value:
                node.replace_input_with(i, outer[value.name])
    replacements = [(old_outputs[v.name], v) for v in new_graph.outputs]
    for _, value in replacements:
        new_graph.outputs.remove(value)
    ir.convenience.replace_all_uses_with(
        [o for o, _ in replacements], [v for _, v in replacements], replace_graph_outputs=True
    )
    for old, value in replacements:
        value.name = old.name
        value.type = old.type if old.type is not None else value.type
        value.shape = old.shape if old.shape is not None else value.shape
    graph.extend(new_nodes)
    orphans = {v.name: v for n in nodes for v in n.inputs if v is not None and v.is_initializer()}
    graph.remove(nodes, safe=True)
    for name, value in orphans.items():
        if not value.uses() and not value.is_graph_output() and graph.initializers.get(name) is value:
            graph.initializers.pop(name)
            if isinstance(value.const_value, ir.ExternalTensor):
                value.const_value.release()
    for domain, version in new.opset_imports.items():
        model.opset_imports.setdefault(domain, version)


def _moved_initializer(
    graph: ir.Graph, value: ir.Value, new_graph: ir.Graph, moved: dict[str, ir.Value], removed: set[int]
) -> ir.Value:
    """The piece's initializer `value` as one of `graph`'s: registered, or the graph's own of that name when
    nodes outside the piece still read it (kept as is), or replacing it when only the piece read it."""
    if value.name in moved:
        return moved[value.name]
    new_graph.initializers.pop(value.name)  # type: ignore[arg-type]
    existing = graph.initializers.get(value.name)  # type: ignore[arg-type]
    if existing is not None:
        if any(id(user) not in removed for user, _ in existing.uses()):
            moved[value.name] = existing  # type: ignore[index]
            return existing
        for user, index in list(existing.uses()):
            user.replace_input_with(index, value)
        graph.initializers.pop(value.name)  # type: ignore[arg-type]
        if isinstance(existing.const_value, ir.ExternalTensor):
            existing.const_value.release()
    graph.register_initializer(value)
    moved[value.name] = value  # type: ignore[index]
    return value


def _value_info(value: ir.Value) -> onnx.ValueInfoProto:
    if value.type is None:
        return helper.make_tensor_value_info(value.name, onnx.TensorProto.FLOAT, None)
    return ir.serde.serialize_value(value)


def save(model: ir.Model, path: Path) -> None:
    """`model` at `path` with its weights streamed into one `<name>.data`, each lazily read tensor unmapped
    once the next is written (graph_passes.pipeline.save_streamed, as optimize_file saves)."""
    save_streamed(model, path, ALIGNMENT)
