"""Outlier-channel split for the CPU INT8 variant (LLM.int8()-style decomposition, in plain ONNX ops).

x W = (x ⊙ m) W + x[..., O] W[O, :], where O are the few input channels with the largest calibrated |x| and
m zeroes them. The first product has no outlier channels, so ONNX Runtime's dynamic per-tensor u8
quantization keeps its precision; the second is a thin fp32 MatMul (K = |O|). A layer that would otherwise
stay wholly in fp32 keeps almost all of its work on the integer kernels.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

DEFAULT_CHANNELS = 8
SUFFIX = "/outlier_fp32"


def split_outliers(
    model: onnx.ModelProto, layers: dict[str, np.ndarray], channels: int = DEFAULT_CHANNELS
) -> onnx.ModelProto:
    """Split each MatMul named in `layers` (node name -> its input's channel maxima) in place; returns model.

    MatMuls reading the same input (Q, K, V) share one mask Mul and one Gather. The thin fp32 MatMul is
    named `<node>/outlier_fp32` so the quantizer can leave it in fp32."""
    inits = {i.name: i for i in model.graph.initializer}
    shared: dict[str, tuple[str, str, np.ndarray]] = {}  # input -> (inliers, outliers, channel index)
    ordered = []
    for node in model.graph.node:
        if node.name not in layers:
            ordered.append(node)
            continue
        x, w_name, p = node.input[0], node.input[1], node.name
        weight = numpy_helper.to_array(inits[w_name])
        if x not in shared:
            top = np.sort(np.argsort(layers[p])[-channels:]).astype(np.int64)
            keep = np.ones(weight.shape[0], np.float32)
            keep[top] = 0.0
            model.graph.initializer.extend(
                [
                    numpy_helper.from_array(keep, f"{p}/inlier_mask"),
                    numpy_helper.from_array(top, f"{p}/outlier_index"),
                ]
            )
            ordered += [
                helper.make_node("Mul", [x, f"{p}/inlier_mask"], [f"{p}/inliers"], name=f"{p}/inlier_Mul"),
                helper.make_node(
                    "Gather",
                    [x, f"{p}/outlier_index"],
                    [f"{p}/outliers"],
                    name=f"{p}/outlier_Gather",
                    axis=-1,
                ),
            ]
            shared[x] = (f"{p}/inliers", f"{p}/outliers", top)
        inliers, outliers, top = shared[x]
        model.graph.initializer.append(
            numpy_helper.from_array(weight[top].astype(np.float32), f"{p}/outlier_weight")
        )
        ordered += [
            helper.make_node("MatMul", [inliers, w_name], [f"{p}/inlier_out"], name=p),
            helper.make_node(
                "MatMul", [outliers, f"{p}/outlier_weight"], [f"{p}/outlier_out"], name=p + SUFFIX
            ),
            helper.make_node(
                "Add", [f"{p}/inlier_out", f"{p}/outlier_out"], [node.output[0]], name=f"{p}/outlier_Add"
            ),
        ]
    del model.graph.node[:]
    model.graph.node.extend(ordered)
    return model
