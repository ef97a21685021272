"""`model.int8.openvino.onnx`: the TensorRT Q/DQ file, rewritten where OpenVINO runs it better.

OpenVINO runs our TensorRT-style Q/DQ file with INT8 kernels (its low-precision transformations turn
each Q/DQ pair into an INT8 layer), faster than ONNX Runtime runs its own CPU INT8 file. Two things in
that file are there for TensorRT and cost OpenVINO time or size (README "CPU engine", measured):

- Layers the sensitivity search kept in high precision (TensorRT runs them in fp16) are fp32 GEMMs on
  OpenVINO's CPU plugin: on the demo 3 of 36 layers took 17% of the time at 8x128. Here their weights
  become per-channel INT8 behind a `DequantizeLinear` with float activations (weight-only), which
  OpenVINO compiles into a compressed-weight FullyConnected: activations stay float, so the accuracy
  that made the search keep them is kept.
- The embedding tables are fp32 (exporter/quantize/embeddings.py makes them INT8 per row).

Everything else is byte for byte the Q/DQ file's arithmetic. The file is judged like every CPU
candidate, by OpenVINO itself on the export's validation inputs (engines/cpu_selection.py).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from exporter.export.external_data import save_onnx
from exporter.quantize.embeddings import quantize_embeddings

logger = logging.getLogger(__name__)

OPENVINO_FILE = "model.int8.openvino.onnx"


def weight_only_int8(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[str]]:
    """MatMuls whose weight (input 1) is a 2-D fp32 initializer read by nothing else get per-output-channel
    symmetric INT8 weights behind a DequantizeLinear (axis 1); returns the model and the nodes changed."""
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    readers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    changed: list[str] = []
    nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        weight = inits.get(node.input[1]) if node.op_type == "MatMul" and len(node.input) == 2 else None
        if (
            weight is None
            or weight.data_type != TensorProto.FLOAT
            or len(weight.dims) != 2
            or readers[weight.name] != 1
        ):
            nodes.append(node)
            continue
        fp32 = numpy_helper.to_array(weight)
        scale = np.abs(fp32).max(axis=0).astype(np.float32) / np.float32(127.0)
        scale = np.where(scale > 0, scale, np.float32(1.0)).astype(np.float32)
        q = np.clip(np.rint(fp32 / scale), -127, 127).astype(np.int8)
        graph.initializer.remove(weight)
        q_name, s_name, deq = weight.name + "_w8", weight.name + "_w8_scale", weight.name + "_w8_dequantized"
        graph.initializer.extend([numpy_helper.from_array(q, q_name), numpy_helper.from_array(scale, s_name)])
        nodes.append(
            helper.make_node(
                "DequantizeLinear", [q_name, s_name], [deq], name=f"{node.name}_weight_dq", axis=1
            )
        )
        node.input[1] = deq
        nodes.append(node)
        changed.append(node.name)
    del graph.node[:]
    graph.node.extend(nodes)
    return model, changed


def build_openvino_file(qdq_path: Path, out: Path) -> dict[str, Any]:
    """Write the OpenVINO variant of the Q/DQ file at `qdq_path` to `out`; returns the report section."""
    model = onnx.load(str(qdq_path))
    model, weight_only = weight_only_int8(model)
    model, tables = quantize_embeddings(model)
    save_onnx(model, out)
    logger.info(
        "OpenVINO INT8 file: %d layers weight-only INT8, %d embedding tables INT8",
        len(weight_only),
        len(tables),
    )
    return {
        "file": out.name,
        "from": qdq_path.name,
        "scheme": (
            "the Q/DQ file's static s8 activations x per-channel s8 weights; its high-precision layers as "
            "weight-only per-channel INT8 (float activations); embedding tables INT8 per row"
        ),
        "weight_only_int8": weight_only,
        "embeddings": [t.to_json() for t in tables],
    }
