"""Embedding tables in INT8, per row: the largest tensor of a small encoder leaves fp32.

The word-embedding table of all-MiniLM-L6-v2 (30522 x 384 fp32, 44.7 MiB) is 87% of the demo's CPU INT8
file, because dynamic quantization only quantizes MatMul weights. A `Gather` reads a few rows per token,
so the table can stay INT8 in the file *and* in memory and be dequantized after the lookup, in standard
ONNX every runtime reads (ONNX Runtime, OpenVINO):

    Gather(table, ids)  ->  Mul(Cast(Gather(table_q8, ids), float), Gather(row_scale, ids))

Per-row symmetric scales (`max |row| / 127`): rows of an embedding table differ in norm (frequent
tokens have small rows), so one scale per table would crush the small ones. Cost: one int8 Gather, one
Cast, one Mul on [batch, sequence, hidden] per table, measured as no slower on ONNX Runtime and
OpenVINO (README "CPU engine"); `DequantizeLinear` *before* the Gather would dequantize the whole table
per run on ONNX Runtime (it does not constant-fold DequantizeLinear).

A table also read by another node (a tied LM head) stays fp32: that reader would need the full table.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

MIN_ELEMENTS = 1 << 16  # smaller tables (token types) are not worth three nodes
SUFFIXES = ("_q8", "_row_scale")


@dataclasses.dataclass(frozen=True)
class QuantizedTable:
    name: str
    shape: tuple[int, ...]
    bytes_before: int
    bytes_after: int
    max_abs_err: float  # of the dequantized table vs the fp32 one

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def quantize_rows(table: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(int8 table, float32 scale per row [rows, 1]), symmetric: q = round(x / scale), |q| <= 127."""
    scale = np.abs(table).max(axis=1, keepdims=True).astype(np.float32) / np.float32(127.0)
    scale = np.where(scale > 0, scale, np.float32(1.0)).astype(np.float32)  # an all-zero row stays zero
    q = np.clip(np.rint(table / scale), -127, 127).astype(np.int8)
    return q, scale


def quantize_embeddings(
    model: onnx.ModelProto, min_elements: int = MIN_ELEMENTS
) -> tuple[onnx.ModelProto, list[QuantizedTable]]:
    """Rewrite (in place) every `Gather` on axis 0 of a 2-D fp32 initializer with at least `min_elements`
    that no other node reads; returns the model and what was quantized."""
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    readers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    outputs = {o.name for o in graph.output}
    done: list[QuantizedTable] = []
    nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        table = inits.get(node.input[0]) if node.op_type == "Gather" and node.input else None
        if (
            table is None
            or readers.get(table.name, 0) != 1
            or table.name in outputs
            or table.data_type != TensorProto.FLOAT
            or len(table.dims) != 2
            or table.dims[0] * table.dims[1] < min_elements
            or _axis(node) != 0
        ):
            nodes.append(node)
            continue
        fp32 = numpy_helper.to_array(table)
        q, scale = quantize_rows(fp32)
        q_name, s_name = (table.name + suffix for suffix in SUFFIXES)
        graph.initializer.remove(table)
        graph.initializer.extend([numpy_helper.from_array(q, q_name), numpy_helper.from_array(scale, s_name)])
        ids, out = node.input[1], node.output[0]
        base = node.name or out
        nodes += [
            helper.make_node("Gather", [q_name, ids], [out + "_q8"], name=base + "_q8", axis=0),
            helper.make_node(
                "Cast", [out + "_q8"], [out + "_q8_float"], name=base + "_cast", to=TensorProto.FLOAT
            ),
            helper.make_node("Gather", [s_name, ids], [out + "_row_scale"], name=base + "_row_scale", axis=0),
            helper.make_node(
                "Mul", [out + "_q8_float", out + "_row_scale"], [out], name=base + "_dequantize"
            ),
        ]
        done.append(
            QuantizedTable(
                table.name,
                tuple(fp32.shape),
                fp32.nbytes,
                q.nbytes + scale.nbytes,
                float(np.max(np.abs(q.astype(np.float32) * scale - fp32))),
            )
        )
    del graph.node[:]
    graph.node.extend(nodes)
    return model, done


def _axis(node: onnx.NodeProto) -> int:
    return next((a.i for a in node.attribute if a.name == "axis"), 0)
