"""Graph lookups for the ONNX-proto rewrites of the INT4 CPU file, and the part of a graph that computes some
tensors as a model of its own (to evaluate it once on ONNX Runtime).

`GraphIndex`: initializers, the node producing each tensor, the nodes reading it, the graph outputs: what
every proto-level rewrite here looks up. Two INT4 rewrites need a value the exported graph computes from its inputs alone: the rotary cos/sin rows
(int4_packed_gqa: tabulated over every position) and the attention bias (int4_padding_bias: checked against
the padding-only bias). Both walk up from the tensor to graph inputs and initializers and run that slice.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import Collection, Sequence

import onnx
from onnx import helper


def remove_nodes(graph: onnx.GraphProto, names: Collection[str]) -> None:
    """Drop the nodes named `names` and every initializer no remaining node reads (a rewrite's leftovers)."""
    if not names:
        return
    kept = [n for n in graph.node if n.name not in names]
    del graph.node[:]
    graph.node.extend(kept)
    used = {i for n in graph.node for i in n.input}
    kept_inits = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept_inits)


@dataclasses.dataclass(frozen=True)
class GraphIndex:
    """Lookups of one graph as it is now (build a new one after a rewrite)."""

    inits: dict[str, onnx.TensorProto]
    producer: dict[str, onnx.NodeProto]
    consumers: dict[str, list[onnx.NodeProto]]
    inputs: dict[str, onnx.ValueInfoProto]
    outputs: set[str]

    @classmethod
    def of(cls, graph: onnx.GraphProto) -> GraphIndex:
        consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        for node in graph.node:
            for name in node.input:
                consumers[name].append(node)
        return cls(
            inits={i.name: i for i in graph.initializer},
            producer={o: n for n in graph.node for o in n.output},
            consumers=consumers,
            inputs={i.name: i for i in graph.input},
            outputs={o.name for o in graph.output},
        )


def upstream_model(
    model: onnx.ModelProto, outputs: Sequence[str], name: str, allowed_inputs: Collection[str] | None = None
) -> onnx.ModelProto | None:
    """A model of the nodes computing `outputs` (float tensors) from graph inputs and initializers, its
    inputs the graph inputs reached (only `allowed_inputs`, when given); None when the outputs depend on
    anything else (a graph input not allowed, or a name nothing produces)."""
    graph = model.graph
    index = GraphIndex.of(graph)
    producer, inits, inputs = index.producer, index.inits, index.inputs
    needed: dict[str, onnx.NodeProto] = {}
    sources: set[str] = set()
    stack = list(outputs)
    while stack:
        tensor = stack.pop()
        node = producer.get(tensor)
        if node is None:
            if tensor in inputs and (allowed_inputs is None or tensor in allowed_inputs):
                sources.add(tensor)
            elif tensor not in inits:
                return None
            continue
        if node.name not in needed:
            needed[node.name] = node
            stack.extend(i for i in node.input if i)
    order = [n for n in graph.node if n.name in needed]
    used = {i for n in order for i in n.input}
    return helper.make_model(
        helper.make_graph(
            order,
            name,
            [inputs[s] for s in sorted(sources)],
            [helper.make_tensor_value_info(o, onnx.TensorProto.FLOAT, None) for o in outputs],
            [inits[i] for i in used if i in inits],
        ),
        opset_imports=list(model.opset_import),
        ir_version=model.ir_version,
    )
