"""Packed MatMulNBits -> Split -> Add(constant bias) on every output  ==>  MatMulNBits with the concatenated
bias (its optional input 5) -> Split (the INT4 CPU file's decode graph; Qwen2's q/k/v biases).

Why: Qwen2 adds a bias to q, k and v after the projections, so in the packed file three Adds sit between the
Split and the rotary, and the packed-query GroupQueryAttention fusion (int4_packed_gqa.py) does not match:
Qwen2 kept Split + 2 RotaryEmbedding + 3 Add per layer where Llama runs one attention node. MatMulNBits takes
a bias [N] of its own, added to its output, so the Adds fold into the packed projection and the layer then
has Llama's shape (and its fusion).

Identity, checked before rewriting (anything else is left as it is): the Split reads one MatMulNBits output
that nothing else reads, the MatMulNBits has no bias yet, the Split's sizes are constant; each Split output
is read by exactly one Add and nothing else (no graph output), whose other input is a constant float vector
of that output's width. Then MatMulNBits(x) + concat(b_q, b_k, b_v), split, is per element the same sum of
the same two numbers; ONNX Runtime adds the bias after its accumulation (tests: the logits of the folded file
vs the unfolded one, prefill and decode).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from exporter.quantize.subgraph import GraphIndex, remove_nodes

MS_DOMAIN = "com.microsoft"
_BIAS = 5  # MatMulNBits input slot: A, B, scales, zero_points, g_idx, bias


def fold_split_biases(model: onnx.ModelProto) -> int:
    """Rewrite, in place, every matching packed projection; returns how many took their biases."""
    graph = model.graph
    index = GraphIndex.of(graph)
    inits, producer, readers, outputs = index.inits, index.producer, index.consumers, index.outputs
    removed: set[str] = set()
    folded = 0
    for split in graph.node:
        if split.op_type != "Split" or split.domain not in ("", "ai.onnx") or len(split.input) != 2:
            continue
        matmul = producer.get(split.input[0])
        if matmul is None or matmul.op_type != "MatMulNBits" or matmul.domain != MS_DOMAIN:
            continue
        if len(matmul.input) > _BIAS and matmul.input[_BIAS]:
            continue
        if split.input[0] in outputs or len(readers[split.input[0]]) != 1 or split.input[1] not in inits:
            continue
        sizes = [int(v) for v in numpy_helper.to_array(inits[split.input[1]])]
        biases = _biases(split, sizes, inits, readers, outputs)
        if biases is None:
            continue
        adds, values = biases
        name = f"{matmul.name}_bias"
        graph.initializer.append(numpy_helper.from_array(np.concatenate(values).astype(np.float32), name))
        inputs = list(matmul.input) + [""] * max(0, _BIAS + 1 - len(matmul.input))
        inputs[_BIAS] = name
        del matmul.input[:]
        matmul.input.extend(inputs)
        for position, add in enumerate(adds):
            split.output[position] = add.output[0]
        removed.update(a.name for a in adds)
        folded += 1
    remove_nodes(graph, removed)
    return folded


def _biases(split, sizes, inits, readers, outputs):  # type: ignore[no-untyped-def]
    """(the Add of each Split output, its bias) when every output is read by one Add of a constant float
    vector of its width, else None."""
    adds, values = [], []
    if len(sizes) != len(split.output):
        return None
    for output, size in zip(split.output, sizes, strict=True):
        found = readers[output]
        if output in outputs or len(found) != 1:
            return None
        add = found[0]
        if add.op_type != "Add" or add.domain not in ("", "ai.onnx") or len(add.input) != 2:
            return None
        other = add.input[0] if add.input[1] == output else add.input[1]
        if other == output or other not in inits:
            return None
        bias = numpy_helper.to_array(inits[other])
        if bias.dtype != np.float32 or bias.shape != (size,):
            return None
        adds.append(add)
        values.append(bias)
    return adds, values
