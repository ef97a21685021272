"""GroupQueryAttention's attention_bias: the exported causal-and-padding mask (~40 shape/compare nodes per
step) ==> a padding-only bias from attention_mask (6 nodes), where the kernel's own causality makes the two
equal (the INT4 CPU file's decode graph).

Why: at batch 1 each ONNX Runtime node costs a few microseconds whatever its size; transformers' exported
mask (Range, Unsqueeze, LessOrEqual, And, Flatten, Gather, Expand, Where, ...) is rebuilt on every decode
step, onnxruntime-genai's builder computes its mask inputs in 6 nodes.

Identity: GroupQueryAttention with causal=1 (and no local window) adds -inf for key t > P + s to query row s
(P past tokens) itself, so only the bias at keys t <= P + s matters. There the new bias is
    bias[b, 0, s, t] = 0 if attention_mask[b, t] else m,    m = the exported mask's own masked value,
expanded to [B, 1, S, T]. The rewrite is made only after checking, on ONNX Runtime, that the exported bias
has exactly these values at every t <= P + s for a batch of 2 (one row left-padded) at prefill (P = 0), at
a decode step, and at the last positions the file supports (P + S = max_positions): a mask that also encodes
something else (a sliding window, a bidirectional prefix, an unmasked all-padding row) fails the check and is
left as it is. Tested in tests/test_int4_decode_graph.py (left-padded batch, prefill and decode).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from exporter.quantize.int4_prelude import SEQUENCE_SHAPE, left_padded_feeds, sequence_shape_node
from exporter.quantize.subgraph import upstream_model

MS_DOMAIN = "com.microsoft"
_BIAS = 10  # GroupQueryAttention input slot (ONNX Runtime 1.32 schema)


def simplify_attention_bias(model: onnx.ModelProto, max_positions: int = 4096) -> int:
    """Rewire, in place, every causal GroupQueryAttention whose bias passes the check; returns how many."""
    graph = model.graph
    users: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        if node.op_type == "GroupQueryAttention" and node.domain == MS_DOMAIN and len(node.input) > _BIAS:
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            if node.input[_BIAS] and attrs.get("causal", 1) == 1 and attrs.get("local_window_size", -1) == -1:
                users.setdefault(node.input[_BIAS], []).append(node)
    inputs = {i.name for i in graph.input}
    if not users or not {"attention_mask", "input_ids"} <= inputs:
        return 0
    rewired, added = 0, []
    for bias, nodes in users.items():
        masked = _masked_value(model, bias, max_positions)
        if masked is None:
            continue
        new, subgraph = _padding_bias(model, bias, masked)
        for node in nodes:
            node.input[_BIAS] = new
        rewired += len(nodes)
        added.extend(subgraph)
    have = {o for n in graph.node for o in n.output}
    unique = {n.output[0]: n for n in added if n.output[0] not in have}  # one Shape(input_ids)[1:2]
    added = list(unique.values())
    if added:
        existing = list(graph.node)
        del graph.node[:]
        graph.node.extend([*added, *existing])  # they read graph inputs and constants only: valid first
    return rewired


def _padding_bias(model: onnx.ModelProto, bias: str, masked: float) -> tuple[str, list[onnx.NodeProto]]:
    graph = model.graph
    p = f"{bias}_padding"
    graph.initializer.extend(
        [
            numpy_helper.from_array(np.array(0, np.int64), f"{p}_zero_id"),
            numpy_helper.from_array(np.array(masked, np.float32), f"{p}_masked"),
            numpy_helper.from_array(np.array(0.0, np.float32), f"{p}_open"),
            numpy_helper.from_array(np.array([1, 2], np.int64), f"{p}_axes"),
            numpy_helper.from_array(np.array([1], np.int64), f"{p}_one"),
            numpy_helper.from_array(np.array([1, 1], np.int64), f"{p}_ones"),
        ]
    )
    nodes = [
        helper.make_node("Equal", ["attention_mask", f"{p}_zero_id"], [f"{p}_is_pad"], name=f"{p}_equal"),
        helper.make_node(
            "Where", [f"{p}_is_pad", f"{p}_masked", f"{p}_open"], [f"{p}_2d"], name=f"{p}_where"
        ),
        helper.make_node("Unsqueeze", [f"{p}_2d", f"{p}_axes"], [f"{p}_4d"], name=f"{p}_unsqueeze"),
        sequence_shape_node(),  # [S]: shared with the attention's length inputs (int4_prelude.py)
        helper.make_node(
            "Concat", [f"{p}_ones", SEQUENCE_SHAPE, f"{p}_one"], [f"{p}_target"], axis=0, name=f"{p}_concat"
        ),
        helper.make_node("Expand", [f"{p}_4d", f"{p}_target"], [f"{p}_bias"], name=f"{p}_expand"),
    ]
    return f"{p}_bias", nodes


def _masked_value(model: onnx.ModelProto, bias: str, max_positions: int) -> float | None:
    """The exported bias's masked value when, at every key the kernel's causality keeps, it is exactly the
    padding-only bias (checked on ONNX Runtime over prefill, a decode step and the last positions)."""
    import onnxruntime as ort

    sub = upstream_model(model, [bias], "attention_bias")
    if sub is None:
        return None
    try:
        session = ort.InferenceSession(sub.SerializeToString(), providers=["CPUExecutionProvider"])
    except Exception:
        return None
    masked: float | None = None
    for past, new in ((0, 7), (6, 1), (max_positions - 4, 4)):
        feeds = left_padded_feeds(session, 2, past, new)
        if feeds is None:
            return None
        (value,) = session.run([bias], feeds)
        mask = feeds.get("attention_mask")
        if mask is None or value.shape != (2, 1, new, past + new):
            return None
        keep = np.arange(past + new)[None, :] <= (past + np.arange(new))[:, None]  # [S, T]
        pad = (mask == 0)[:, None, None, :]  # [B, 1, 1, T]
        lows = value[np.broadcast_to(pad, value.shape) & keep]
        if lows.size == 0 or not np.all(lows == lows.flat[0]) or lows.flat[0] >= -1e30:
            return None
        if masked is not None and lows.flat[0] != masked:
            return None
        masked = float(lows.flat[0])
        if np.any(value[np.broadcast_to(~pad, value.shape) & keep] != 0):
            return None
    return masked
