"""MatMuls reading one input with constant weights -> one MatMul on the concatenated weight + Split.

Identity: [x·W1, x·W2, x·W3] = Split(x·[W1 | W2 | W3], [N1, N2, N3], axis=-1). At batch 1 a decode step is
one row per MatMul, so each kernel call is dominated by its fixed cost (thread dispatch, activation
quantization in MatMulNBits): one call with N1+N2+N3 columns replaces three (q/k/v; gate/up with `roles`).
The packed node is named after the first member plus "_packed" and its weight after the first weight plus
"_packed"; the Split outputs keep the members' output names, so nothing downstream changes. Running the pass
again changes nothing (each input is read by one MatMul then).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Collection, Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper

PACKED = "_packed"


def pack_matmuls(
    model: onnx.ModelProto,
    include: Sequence[str] = ("q_proj", "k_proj", "v_proj"),
    keep_separate: Collection[str] = (),
) -> dict[str, list[str]]:
    """Pack, in place, every group of >= 2 constant-weight MatMuls sharing an input whose node names contain
    one of `include` (e.g. "gate_proj", "up_proj"), except groups with a member in `keep_separate`;
    returns packed node name -> the member node names, in column order."""
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    groups: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for node in graph.node:
        if (
            node.op_type == "MatMul"
            and node.domain in ("", "ai.onnx")
            and node.input[1] in inits
            and len(inits[node.input[1]].dims) == 2
            and any(role in node.name for role in include)
        ):
            groups[node.input[0]].append(node)
    packed_groups: dict[str, list[str]] = {}
    replace: dict[str, list[onnx.NodeProto]] = {}
    for members in groups.values():
        if len(members) < 2 or any(m.name in keep_separate for m in members):
            continue
        weights = [numpy_helper.to_array(inits[m.input[1]]) for m in members]
        packed = np.concatenate(weights, axis=1)
        first = members[0]
        weight_name, out = first.input[1] + PACKED, first.output[0] + PACKED
        graph.initializer.append(numpy_helper.from_array(packed, weight_name))
        sizes = numpy_helper.from_array(
            np.array([w.shape[1] for w in weights], np.int64), weight_name + "_split"
        )
        graph.initializer.append(sizes)
        matmul = helper.make_node("MatMul", [first.input[0], weight_name], [out], name=first.name + PACKED)
        split = helper.make_node(
            "Split",
            [out, sizes.name],
            [m.output[0] for m in members],
            axis=-1,
            name=first.name + PACKED + "_split",
        )
        replace[first.name] = [matmul, split]
        for member in members[1:]:
            replace[member.name] = []
        packed_groups[matmul.name] = [m.name for m in members]
    if not replace:
        return packed_groups
    nodes = []
    for node in graph.node:
        nodes.extend(replace.get(node.name, [node]) if node.op_type == "MatMul" else [node])
    used = {i for n in nodes for i in n.input}
    kept = [i for i in graph.initializer if i.name in used]
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.initializer[:]
    graph.initializer.extend(kept)
    return packed_groups
