"""SmoothQuant-style scale migration: move activation outliers into the weights before static INT8.

Identity: for a MatMul y = x W with per-input-channel factors s > 0, y = (x / s)(diag(s) W). Choosing
s_k = max|x_k|^alpha / max|W_k,:|^(1 - alpha) flattens the activation's outlier channels (which ruin a
per-tensor activation scale) at the cost of a wider per-channel weight range (which per-channel weight
quantization absorbs). The division is an explicit Mul on the activation, shared by all MatMuls reading it
(Q, K and V read one LayerNorm output); in BERT's post-LN blocks that output also feeds the residual Add, so
the factor cannot be folded into the LayerNorm's gamma. Applied only to activations whose channel maxima
are outlier-heavy (max / median above `OUTLIER_RATIO`).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from exporter.export.external_data import save_onnx
from exporter.quantize.calibration import CalibrationData
from exporter.quantize.ranges import Maxima, cached_channel_max

logger = logging.getLogger(__name__)

ALPHA = 0.5
OUTLIER_RATIO = 8.0


def smooth(
    fp32: Path,
    tmp: Path,
    data: CalibrationData,
    config: Any,
    alpha: float = ALPHA,
    cache: Maxima | None = None,
    also: Sequence[str] = (),
    model: onnx.ModelProto | None = None,
) -> tuple[Path, dict[str, Any]]:
    """Write the smoothed fp32 model to `tmp`; return its path and what was smoothed (`fp32` itself, nothing
    written, when no activation qualifies: the same graph). `cache`: channel maxima shared with the Q/DQ
    ranges and the CPU file's outlier split (exporter/quantize/ranges.py cached_channel_max); `also`: tensors
    whose max |x| is measured into `cache` in the same pass over the calibration set (the Q/DQ file's
    activations: the ranges' first pass when nothing is smoothed). `model`: the graph of `fp32` already read;
    changed in place where something is smoothed (the caller reads the smoothed file, not it)."""
    model = model if model is not None else onnx.load(str(fp32))
    inits = {i.name: i for i in model.graph.initializer}
    consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for node in model.graph.node:
        if node.op_type == "MatMul" and node.input[1] in inits and len(inits[node.input[1]].dims) == 2:
            consumers[node.input[0]].append(node)
    channel_max = cached_channel_max(
        cache, fp32, model, list(consumers), data, tmp, config.num_samples, "smoothing", whole=also
    )
    smoothed = []
    for tensor, nodes in consumers.items():
        act = channel_max[tensor]
        if act.max() / max(float(np.median(act)), 1e-12) < OUTLIER_RATIO:
            continue
        weights = [numpy_helper.to_array(inits[n.input[1]]) for n in nodes]
        w_max = np.max([np.abs(w).max(axis=1) for w in weights], axis=0)
        s = np.clip(
            np.power(np.maximum(act, 1e-5), alpha) / np.power(np.maximum(w_max, 1e-5), 1 - alpha), 1e-2, 1e2
        )
        _apply(model, tensor, nodes, weights, s.astype(np.float32), inits)
        smoothed.append(
            {
                "tensor": tensor,
                "matmuls": [n.name for n in nodes],
                "ratio_before": float(act.max() / np.median(act)),
            }
        )
    report = {"alpha": alpha, "outlier_ratio": OUTLIER_RATIO, "smoothed": smoothed}
    if not smoothed:
        return fp32, report
    used = {i for n in model.graph.node for i in n.input}
    unused = [i for i in model.graph.initializer if i.name not in used]
    for init in unused:
        model.graph.initializer.remove(init)
    path = tmp / "smoothed.onnx"
    save_onnx(model, path)
    return path, report


def _apply(model, tensor, nodes, weights, s, inits) -> None:  # type: ignore[no-untyped-def]
    scaled = f"{tensor}_smoothed"
    model.graph.initializer.append(
        numpy_helper.from_array((1.0 / s).astype(np.float32), f"{tensor}_smooth_inv")
    )
    mul = onnx.helper.make_node("Mul", [tensor, f"{tensor}_smooth_inv"], [scaled], name=f"{tensor}_Smooth")
    first = min(list(model.graph.node).index(n) for n in nodes)
    model.graph.node.insert(first, mul)
    for node, weight in zip(nodes, weights, strict=True):
        node.input[0] = scaled
        name = f"{node.input[1]}_smoothed_{node.name}"
        model.graph.initializer.append(
            numpy_helper.from_array((weight * s[:, None]).astype(np.float32), name)
        )
        node.input[1] = name
