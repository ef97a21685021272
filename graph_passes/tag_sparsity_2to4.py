"""2:4 structured-sparsity tagging (and optional enforcement) of MatMul / Gemm / Conv weights.

Sparse Tensor Cores (Ampere and later, TensorRT's `SPARSE_WEIGHTS` builder flag) skip half of the
multiply-adds when every group of 4 consecutive weights *along the reduction dimension* has at most 2
non-zeros. ONNX has no way to say so, so this pass checks each constant weight and records the result:
node metadata `sparsity_2to4` = "eligible" / "dense" / "skipped: <why>", and a model-level JSON summary
under the same key. The engine builder turns the sparse flag on when anything is tagged.

Reduction dimension: MatMul B [K, N] -> K (axis 0); Gemm B -> K (axis 0, or 1 with transB=1); Conv
W [O, C/g, kH, kW] -> C (axis 1). Weights behind a DequantizeLinear (after Q/DQ insertion) are read
through it: with zero point 0 (our symmetric INT8) an int8 zero is a real zero.

Size threshold (`min_dim`, default 256 for both K and N): a heuristic, not a measured constant. Sparse
kernels gain only when the GEMM is compute-bound and large enough to amortise the metadata; NVIDIA
reports gains on transformer GEMMs with K, N in the thousands. This machine has no GPU, so the value was
not measured here; TensorRT itself times sparse vs dense tactics per layer and keeps the faster, so the
threshold only decides what we call eligible and what `enforce` prunes. Change it per call.

`enforce`: weights that pass the shape checks but are dense are pruned to 2:4 by magnitude (keep the 2
largest |w| of each group of 4 along the reduction dim). This changes the model: the report lists each
pruned weight with its relative Frobenius error; the accuracy cost on real data is for the export's
accuracy check to measure.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx_ir as ir

from graph_passes.base import GraphPass, PassReport

METADATA_KEY = "sparsity_2to4"


@dataclass(frozen=True)
class WeightSite:
    node: ir.Node
    tensor_value: ir.Value  # the initializer holding the numbers (float, or int8 behind DequantizeLinear)
    axis: int  # reduction axis of the stored tensor


def weight_site(node: ir.Node) -> WeightSite | None:
    """The constant weight of a MatMul / Gemm / Conv and its reduction axis, else None."""
    if node.domain != "" or node.op_type not in ("MatMul", "Gemm", "Conv") or len(node.inputs) < 2:
        return None
    value = node.inputs[1]
    if value is None:
        return None
    producer = value.producer()
    if producer is not None and producer.op_type == "DequantizeLinear":
        value = producer.inputs[0]
    if value is None or value.const_value is None:
        return None
    if node.op_type == "Conv":
        axis = 1
    elif node.op_type == "Gemm":
        axis = 1 if node.attributes.get_int("transB", 0) else 0
    else:
        axis = 0
    return WeightSite(node, value, axis)


def _only_weight_uses(value: ir.Value) -> bool:
    """Every use of `value` is as a GEMM/Conv weight (or DequantizeLinear input): safe to prune in place."""
    for node, index in value.uses():
        as_weight = node.op_type in ("MatMul", "Gemm", "Conv") and index == 1
        if not (as_weight or (node.op_type == "DequantizeLinear" and index == 0)):
            return False
    return True


def is_2to4(array: np.ndarray, axis: int) -> bool:
    """Every group of 4 consecutive entries along `axis` has at most 2 non-zeros."""
    moved = np.moveaxis(array, axis, 0)
    groups = moved.reshape(moved.shape[0] // 4, 4, -1)
    return bool(((groups != 0).sum(axis=1) <= 2).all())


def prune_2to4(array: np.ndarray, axis: int) -> np.ndarray:
    """Keep the 2 largest-magnitude entries of every group of 4 along `axis`, zero the others."""
    moved = np.moveaxis(array, axis, 0)
    groups = moved.reshape(moved.shape[0] // 4, 4, -1).copy()
    order = np.argsort(np.abs(groups), axis=1)  # ascending: first two are the smallest
    np.put_along_axis(groups, order[:, :2, :], 0, axis=1)
    return np.moveaxis(groups.reshape(moved.shape), 0, axis)


class TagSparsity2to4(GraphPass):
    name = "tag-sparsity-2to4"

    def __init__(self, mode: str = "tag", min_dim: int = 256) -> None:
        super().__init__()
        if mode not in ("tag", "enforce"):
            raise ValueError(f"sparsity mode must be 'tag' or 'enforce', not {mode!r}")
        self.mode, self.min_dim = mode, min_dim

    def apply(self, model: ir.Model, report: PassReport) -> None:
        """Counts are changes (tags written, weights pruned); the census of every weight is in details."""
        census: Counter[str] = Counter()
        eligible = []
        for node in ir.traversal.RecursiveGraphIterator(model.graph):
            site = weight_site(node)
            if site is None:
                continue
            status, detail = self._visit(site)
            const = site.tensor_value.const_value
            if isinstance(const, ir.ExternalTensor):
                const.release()  # a lazily read weight (a streamed model's): unmap it once inspected
            detail["status"] = status
            census[status.split(":")[0]] += 1
            report.details.append(detail)
            if detail.get("pruned"):
                report.counts["pruned"] = report.counts.get("pruned", 0) + 1
            if node.metadata_props.get(METADATA_KEY) != status:
                node.metadata_props[METADATA_KEY] = status
                report.counts["tagged"] = report.counts.get("tagged", 0) + 1
            if status == "eligible":
                eligible.append({"node": node.name, "weight": detail["weight"], "shape": detail["shape"]})
        summary = json.dumps(
            {"eligible": len(eligible), "census": dict(census), "weights": eligible, "min_dim": self.min_dim}
        )
        if model.metadata_props.get(METADATA_KEY) != summary:
            model.metadata_props[METADATA_KEY] = summary
            report.modified = True

    def _visit(self, site: WeightSite) -> tuple[str, dict[str, Any]]:
        assert site.tensor_value.const_value is not None  # weight_site only returns constants
        array = site.tensor_value.const_value.numpy()
        shape = list(array.shape)
        detail: dict[str, Any] = {
            "node": site.node.name,
            "op": site.node.op_type,
            "weight": site.tensor_value.name,
            "shape": shape,
        }
        k = shape[site.axis]
        other = int(np.prod(shape)) // k
        if k % 4:
            return "skipped: reduction dim not divisible by 4", detail
        if min(k, other) < self.min_dim:
            return f"skipped: smaller than min_dim={self.min_dim}", detail
        if is_2to4(array, site.axis):
            return "eligible", detail
        if self.mode == "tag":
            return "dense", detail
        if not _only_weight_uses(site.tensor_value):
            return "dense: not pruned, the tensor has non-GEMM uses (tied embedding?)", detail
        pruned = prune_2to4(array, site.axis).astype(array.dtype)
        norm = float(np.linalg.norm(array.astype(np.float64))) or 1.0
        detail["relative_error"] = float(np.linalg.norm((array - pruned).astype(np.float64))) / norm
        site.tensor_value.const_value = ir.tensor(pruned, name=site.tensor_value.name)
        detail["pruned"] = True
        return "eligible", detail
