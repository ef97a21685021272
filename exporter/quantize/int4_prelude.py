"""GroupQueryAttention's length inputs (seqlens_k, total_sequence_length, query_seqlens): the exported
shape arithmetic (8 nodes) ==> 3 Shape reads and 5 small nodes, the shape reads shared with the padding bias
(the INT4 CPU file's decode graph).

Why: at batch 1 every ONNX Runtime node costs a few microseconds of dispatch whatever its size (profile of a
decode step, README "INT4": the 17 nodes before the first layer cost ~100 us of a ~3.4 ms step under the
profiler, onnxruntime-genai's builder spends 7 nodes there). The three inputs depend on shapes only:
    total_sequence_length = T (int32 scalar),  seqlens_k = T - 1 (int32 [B]),  query_seqlens = S (int32 [B])
with B, S the dimensions of input_ids and T the length of attention_mask. The new nodes compute exactly that:
    sT = Shape(attention_mask)[1:2], sB = Shape(input_ids)[0:1], sS = Shape(input_ids)[1:2],
    total = Cast(Squeeze(sT)), seqlens_k = Expand(total - 1, sB), query_seqlens = Cast(Expand(sS, sB)).
The rewrite is made only after checking, on ONNX Runtime, that the exported nodes give these same values
(dtype, shape and value) at batch 1 and 2, prefill, a decode step and a chunk after a past; any other
computation of those inputs (a sliding window, a per-row length) fails the check and is left as it is.
Tested in tests/test_int4_decode_graph.py (prefill + decode steps of a left-padded batch of 2, bit-exact).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from exporter.quantize.subgraph import upstream_model

MS_DOMAIN = "com.microsoft"
_SEQLENS, _TOTAL, _QUERY_SEQLENS = 5, 6, 16  # GroupQueryAttention input slots (ONNX Runtime 1.32 schema)
PREFIX = "gqa_lengths"
# The padding bias (int4_padding_bias.py) reads the same Shape(input_ids)[1:2]: one node serves both.
SEQUENCE_SHAPE = f"{PREFIX}_s"


def compact_lengths(model: onnx.ModelProto) -> int:
    """Rewire, in place, every GroupQueryAttention whose length inputs pass the check; returns how many."""
    graph = model.graph
    attentions = [
        n
        for n in graph.node
        if n.op_type == "GroupQueryAttention" and n.domain == MS_DOMAIN and len(n.input) > _QUERY_SEQLENS
    ]
    if not attentions or not {"attention_mask", "input_ids"} <= {i.name for i in graph.input}:
        return 0
    olds = {tuple(n.input[s] for s in (_SEQLENS, _TOTAL, _QUERY_SEQLENS)) for n in attentions}
    if any(not all(names) for names in olds) or any(name.startswith(PREFIX) for o in olds for name in o):
        return 0
    nodes, names = _nodes()
    have = {n.output[0] for n in graph.node}
    added = [n for n in nodes if n.output[0] not in have]  # the padding bias may already read sS
    graph.initializer.extend(
        i for i in _constants() if i.name not in {init.name for init in graph.initializer}
    )
    graph.node.extend(added)  # checked first (they read graph inputs and constants only), then moved first
    rewired = 0
    for old in olds:
        if not _same_values(model, list(old), list(names)):
            continue
        for node in attentions:
            if tuple(node.input[s] for s in (_SEQLENS, _TOTAL, _QUERY_SEQLENS)) == old:
                for slot, name in zip((_SEQLENS, _TOTAL, _QUERY_SEQLENS), names, strict=True):
                    node.input[slot] = name
                rewired += 1
    nodes_now = list(graph.node)
    existing, ours = nodes_now[: len(nodes_now) - len(added)], nodes_now[len(nodes_now) - len(added) :]
    del graph.node[:]
    graph.node.extend([*ours, *existing] if rewired else existing)  # unused: the graph as it was
    return rewired


def sequence_shape_node() -> onnx.NodeProto:
    """Shape(input_ids)[1:2]: [S], int64 (shared with the padding bias)."""
    return helper.make_node("Shape", ["input_ids"], [SEQUENCE_SHAPE], name=SEQUENCE_SHAPE, start=1, end=2)


def _constants() -> list[onnx.TensorProto]:
    return [numpy_helper.from_array(np.array(1, np.int32), f"{PREFIX}_one")]


def _nodes() -> tuple[list[onnx.NodeProto], tuple[str, str, str]]:
    p = PREFIX
    int32 = onnx.TensorProto.INT32
    nodes = [
        helper.make_node("Shape", ["attention_mask"], [f"{p}_t"], name=f"{p}_t", start=1, end=2),
        helper.make_node("Shape", ["input_ids"], [f"{p}_b"], name=f"{p}_b", start=0, end=1),
        sequence_shape_node(),
        helper.make_node("Squeeze", [f"{p}_t"], [f"{p}_t_scalar"], name=f"{p}_squeeze"),
        helper.make_node("Cast", [f"{p}_t_scalar"], [f"{p}_total"], name=f"{p}_total", to=int32),
        helper.make_node("Sub", [f"{p}_total", f"{p}_one"], [f"{p}_last"], name=f"{p}_sub"),
        helper.make_node("Expand", [f"{p}_last", f"{p}_b"], [f"{p}_seqlens_k"], name=f"{p}_seqlens_k"),
        helper.make_node("Expand", [SEQUENCE_SHAPE, f"{p}_b"], [f"{p}_query_i64"], name=f"{p}_query_expand"),
        helper.make_node("Cast", [f"{p}_query_i64"], [f"{p}_query_seqlens"], name=f"{p}_query", to=int32),
    ]
    return nodes, (f"{p}_seqlens_k", f"{p}_total", f"{p}_query_seqlens")


def _same_values(model: onnx.ModelProto, old: list[str], new: list[str]) -> bool:
    """The exported and the new length inputs agree (dtype, shape, value) over batch 1 and 2 (row 1
    left-padded), prefill, a decode step and a 3-token chunk after a past, on ONNX Runtime."""
    import onnxruntime as ort

    sub = upstream_model(model, [*old, *new], "gqa_lengths")
    if sub is None:
        return False
    for output in sub.graph.output:
        output.type.tensor_type.elem_type = onnx.TensorProto.INT32
    try:
        session = ort.InferenceSession(sub.SerializeToString(), providers=["CPUExecutionProvider"])
    except Exception:
        return False
    for batch in (1, 2):
        for past, length in ((0, 7), (6, 1), (5, 3)):
            feeds = left_padded_feeds(session, batch, past, length)
            if feeds is None:
                return False
            values = session.run(None, feeds)
            for a, b in zip(values[: len(old)], values[len(old) :], strict=True):
                if a.dtype != b.dtype or a.shape != b.shape or not np.array_equal(a, b):
                    return False
    return True


def left_padded_feeds(session, batch: int, past: int, new: int) -> dict[str, np.ndarray] | None:  # type: ignore[no-untyped-def]
    """Feeds for a decoder step check: `batch` rows, the last left-padded by 2 tokens, `past` cached tokens
    and `new` new ones; None where an input is not one of a decoder's."""
    total = past + new
    mask = np.ones((batch, total), np.int64)
    mask[batch - 1, :2] = 0
    feeds: dict[str, np.ndarray] = {}
    for spec in session.get_inputs():
        if spec.name == "attention_mask":
            feeds[spec.name] = mask
        elif spec.name == "input_ids":
            feeds[spec.name] = np.zeros((batch, new), np.int64)
        elif spec.name == "position_ids":
            feeds[spec.name] = np.maximum(np.cumsum(mask, axis=1) - 1, 0)[:, past:]
        elif spec.name.startswith("past_key_values.") and spec.type == "tensor(float)":
            dims = [d if isinstance(d, int) else None for d in spec.shape]
            if len(dims) != 4 or dims[1] is None or dims[3] is None:
                return None
            feeds[spec.name] = np.zeros((batch, dims[1], past, dims[3]), np.float32)
        else:
            return None
    return feeds
