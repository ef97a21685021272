"""Packed q/k/v -> Split -> RotaryEmbedding(q), RotaryEmbedding(k) -> GroupQueryAttention  ==>  one
GroupQueryAttention reading the packed projection with do_rotary=1 (the INT4 CPU file's decode graph).

Why: at batch 1 a decode step of a 512-wide model runs ~2 ms, and each ONNX Runtime node costs a few
microseconds of dispatch whatever its size. The packed MatMulNBits already writes [B, S, (n_q + 2 n_kv)·h],
the layout GroupQueryAttention takes as a packed query (key and value inputs empty), and its do_rotary path
applies the same rotate-half rotary from the same cos/sin rows and position ids that the two
RotaryEmbedding nodes read. Three nodes per layer leave the step (measured: README "INT4", decode graph).

Identity, checked per layer before rewriting (anything else is left as it is):
- Split's input is one node's output, its sizes are [n_q·h, n_kv·h, n_kv·h] (num_heads, kv_num_heads of the
  attention, so n_q·h / n_kv·h = n_q / n_kv), outputs q, k, v in that order, each read only here;
- q and k reach the attention only through RotaryEmbedding nodes with the same position ids, cos and sin
  caches, the same `interleaved`, whole-head rotation (no rotary_embedding_dim), num_heads n_q / n_kv;
- the attention does no rotary yet (do_rotary 0) and takes no cos/sin/position_ids of its own;
- the head size is a multiple of 16 (ONNX Runtime's rotary path refuses others at run time).
GroupQueryAttention's rotary then reads cos_cache[position_ids[b, s]] for token (b, s): the rows and ids the
RotaryEmbedding nodes were given, so positions stay exact (left padding included). Tested in
tests/test_int4.py against the unfused file, prefill and decode, batch 2 with left padding.
"""

from __future__ import annotations

import onnx
from onnx import helper, numpy_helper

from exporter.quantize.subgraph import GraphIndex, remove_nodes, upstream_model

MS_DOMAIN = "com.microsoft"
_COS, _SIN, _POSITIONS = 7, 8, 9  # GroupQueryAttention input slots (ONNX Runtime 1.32 schema)


def fuse_packed_gqa(model: onnx.ModelProto, max_positions: int = 4096) -> int:
    """Rewrite, in place, every matching layer; returns how many attentions now read a packed query."""
    graph = model.graph
    if "position_ids" not in {i.name for i in graph.input}:
        return 0  # the kernel's rotary needs the positions themselves
    tables: dict[tuple[str, str], tuple[str, str] | None] = {}
    index = GraphIndex.of(graph)
    inits, producer, readers, outputs = index.inits, index.producer, index.consumers, index.outputs
    removed: set[str] = set()
    fused = 0
    for attention in graph.node:
        if attention.op_type != "GroupQueryAttention" or attention.domain != MS_DOMAIN:
            continue
        match = _match(attention, producer, readers, inits, outputs)
        if match is None:
            continue
        split, rope_q, rope_k = match
        inputs = list(attention.input) + [""] * max(0, _POSITIONS + 1 - len(attention.input))
        inputs[0:3] = [split.input[0], "", ""]
        key = (rope_q.input[2], rope_q.input[3])
        if key not in tables:
            tables[key] = _position_tables(model, *key, max_positions)
        table = tables[key]
        if table is None:
            continue
        inputs[_COS], inputs[_SIN] = table
        inputs[_POSITIONS] = "position_ids"
        del attention.input[:]
        attention.input.extend(inputs)
        kept = [a for a in attention.attribute if a.name not in ("do_rotary", "rotary_interleaved")]
        del attention.attribute[:]
        attention.attribute.extend(
            [
                *kept,
                helper.make_attribute("do_rotary", 1),
                helper.make_attribute("rotary_interleaved", _attr(rope_q, "interleaved", 0)),
            ]
        )
        removed.update({split.name, rope_q.name, rope_k.name})
        fused += 1
    remove_nodes(graph, removed)
    return fused


def _attr(node: onnx.NodeProto, name: str, default: int) -> int:
    return next((a.i for a in node.attribute if a.name == name), default)


def _match(attention, producer, readers, inits, outputs):  # type: ignore[no-untyped-def]
    """(Split, RotaryEmbedding of q, RotaryEmbedding of k) when the identity above holds, else None."""
    if len(attention.input) < 3 or _attr(attention, "do_rotary", 0):
        return None
    if any(len(attention.input) > i and attention.input[i] for i in (_COS, _SIN, _POSITIONS)):
        return None
    rope_q, rope_k = producer.get(attention.input[0]), producer.get(attention.input[1])
    if rope_q is None or rope_k is None or any(r.op_type != "RotaryEmbedding" for r in (rope_q, rope_k)):
        return None
    if list(rope_q.input[1:4]) != list(rope_k.input[1:4]) or len(rope_q.input) != 4:
        return None
    if _attr(rope_q, "interleaved", 0) != _attr(rope_k, "interleaved", 0):
        return None
    if any(_attr(r, "rotary_embedding_dim", 0) for r in (rope_q, rope_k)):
        return None
    split = producer.get(rope_q.input[0])
    if split is None or split.op_type != "Split" or len(split.output) != 3 or len(split.input) != 2:
        return None
    if list(split.output) != [rope_q.input[0], rope_k.input[0], attention.input[2]]:
        return None
    if _attr(split, "axis", 0) not in (-1, 2) or split.input[1] not in inits:
        return None
    n_q, n_kv = _attr(attention, "num_heads", 0), _attr(attention, "kv_num_heads", 0)
    if _attr(rope_q, "num_heads", n_q) != n_q or _attr(rope_k, "num_heads", n_kv) != n_kv:
        return None
    sizes = [int(v) for v in numpy_helper.to_array(inits[split.input[1]])]
    if n_kv == 0 or sizes[1] % n_kv or sizes != [n_q * sizes[1] // n_kv, sizes[1], sizes[1]]:
        return None
    if (sizes[1] // n_kv) % 16:  # the kernel's rotary path refuses other head sizes at run time
        return None
    private = [
        (rope_q.input[0], rope_q),
        (rope_k.input[0], rope_k),
        (attention.input[2], attention),
        (attention.input[0], attention),
        (attention.input[1], attention),
    ]
    if any(name in outputs or [r.name for r in readers[name]] != [reader.name] for name, reader in private):
        return None
    return split, rope_q, rope_k


def _position_tables(
    model: onnx.ModelProto, cos: str, sin: str, max_positions: int
) -> tuple[str, str] | None:
    """The graph's own cos/sin rows evaluated at positions 0..max_positions-1, as initializers: the nodes
    computing them from `position_ids` (and constants only) run once on ONNX Runtime; None when the rows
    depend on anything else (the layer then keeps its RotaryEmbedding nodes)."""
    import numpy as np
    import onnxruntime as ort

    sub = upstream_model(model, [cos, sin], "rotary_rows", allowed_inputs={"position_ids"})
    if sub is None:
        return None
    session = ort.InferenceSession(sub.SerializeToString(), providers=["CPUExecutionProvider"])
    ids = np.arange(max_positions, dtype=np.int64)[None, :]
    rows = session.run(None, {i.name: ids for i in session.get_inputs()})  # position_ids, if read at all
    names = (f"{cos}_table", f"{sin}_table")
    for name, table in zip(names, rows, strict=True):
        model.graph.initializer.append(numpy_helper.from_array(table.reshape(max_positions, -1), name))
    return names
