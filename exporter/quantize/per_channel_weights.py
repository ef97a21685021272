"""ONNX Runtime's per-channel weight quantization, vectorized: the same bytes without a Python loop per channel.

Why: `quantize_dynamic(per_channel=True)` quantizes each weight in
`BaseQuantizer.quantize_weight_per_channel_impl`, which loops in Python over the output channels and calls
`quantize_data` -> `compute_scale_zp` -> `quantize_nparray` on each one (0-d numpy arrays, a dozen small ops
per channel). On the 45M Llama (68,864 channels) that loop is ~3 s of the CPU INT8 file's ~3.8 s build.
`quantize_weight_per_channel_impl` below does the same arithmetic on whole arrays, step by step in the same
dtypes (float32 ranges, float64 `dr / dq` scale, float64 zero point rounded half-to-even, float32 division
and rounding of the weights, the same clip bounds) and writes the same three initializers the same way
(`make_tensor(... .tolist())` for scale and zero point, `from_array` for the weight), so the quantized file
is byte-identical (tests/test_per_channel_weights.py compares them).

It handles what our CPU INT8 build asks for (float32 weights, 8-bit integer types, symmetric or not,
`reduce_range` on or off, `MinimumRealRange`), and hands anything else to ONNX Runtime's own method:
per-channel overrides, other quantization types (4/16-bit, float 8), float16 weights, empty or non-finite
weights. `install` patches `ONNXQuantizer` (the class `quantize_dynamic` uses) only for ONNX Runtime
versions this was compared against (`TESTED_VERSIONS`); exporter/quantize/cpu_int8.py installs it only in
the child interpreter that builds the CPU file, so the export's own process runs ONNX Runtime unchanged.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np
import onnx
import onnx.numpy_helper

# ONNX Runtime versions whose per-channel arithmetic this reproduces (read from their base_quantizer.py and
# quant_utils.py, and compared byte for byte by the tests). Any other version keeps ORT's own loop.
TESTED_VERSIONS = ("1.32.",)

HANDLED_TYPES = (onnx.TensorProto.INT8, onnx.TensorProto.UINT8)

_original: Any = None  # ORT's method, saved by `install` (the fallback)
calls: Counter[str] = Counter()  # weights quantized per path, in this process: "vectorized" / "onnxruntime"


def install() -> bool:
    """Make `ONNXQuantizer` use `quantize_weight_per_channel_impl` in this process, if ONNX Runtime's
    version is one in `TESTED_VERSIONS`; False (ORT untouched) otherwise. Idempotent."""
    global _original
    import onnxruntime
    from onnxruntime.quantization.onnx_quantizer import ONNXQuantizer

    if not onnxruntime.__version__.startswith(TESTED_VERSIONS):
        return False
    if _original is None:
        _original = ONNXQuantizer.quantize_weight_per_channel_impl
    ONNXQuantizer.quantize_weight_per_channel_impl = quantize_weight_per_channel_impl  # type: ignore[method-assign]
    return True


def summary() -> str:
    """Which path quantized how many weights in this process (for the child's log)."""
    import onnxruntime

    return (
        f"per-channel weights (onnxruntime {onnxruntime.__version__}): "
        f"{calls['vectorized']} vectorized, {calls['onnxruntime']} by ONNX Runtime's loop"
    )


def quantize_weight_per_channel_impl(
    self: Any,
    weight_name: str,
    weight_qType: int,
    channel_axis: int,
    reduce_range: bool = True,
    keep_float_weight: bool = False,
) -> tuple[str, str, str]:
    """Drop-in for `BaseQuantizer.quantize_weight_per_channel_impl` (same signature, same initializers)."""
    from onnxruntime.quantization.quant_utils import (
        TENSOR_NAME_QUANT_SUFFIX,
        find_by_name,
        get_qmin_qmax_for_qType,
        normalize_axis,
    )

    initializer = find_by_name(weight_name, self.model.initializer())
    handled = (
        initializer is not None
        and initializer.data_type == onnx.TensorProto.FLOAT
        and weight_qType in HANDLED_TYPES
        and not self.tensor_quant_overrides.get_per_channel_overrides(weight_name)
        and normalize_axis(channel_axis, len(initializer.dims))[0]
        and 0 not in initializer.dims
    )
    if not handled:
        return _fallback(self, weight_name, weight_qType, channel_axis, reduce_range, keep_float_weight)
    weights = onnx.numpy_helper.to_array(initializer)
    axis = normalize_axis(channel_axis, weights.ndim)[1]
    symmetric = self.is_weight_symmetric(weight_qType)
    reduced = self.reduce_range and reduce_range
    others = tuple(a for a in range(weights.ndim) if a != axis)
    rmin, rmax = weights.min(axis=others), weights.max(axis=others)  # float32, like data.min()/max()
    if not (np.isfinite(rmin).all() and np.isfinite(rmax).all()):
        return _fallback(self, weight_name, weight_qType, channel_axis, reduce_range, keep_float_weight)

    qmin, qmax = get_qmin_qmax_for_qType(weight_qType, reduced, symmetric=symmetric)
    zero_point, scale = _scale_zero_point(rmin, rmax, qmin, qmax, symmetric, self.min_real_range)
    shape = [1] * weights.ndim
    shape[axis] = -1
    # quantize_nparray: float32 weights / float32 scale, rounded half-to-even, + zero point, clipped to the
    # type's full range, cast.
    low, high = get_qmin_qmax_for_qType(weight_qType, reduce_range=False, symmetric=False)
    quantized = np.divide(weights, scale.reshape(shape))
    np.round(quantized, out=quantized)
    np.add(quantized, zero_point.reshape(shape), out=quantized)
    np.clip(quantized, low, high, out=quantized)

    q_weight_name = weight_name + TENSOR_NAME_QUANT_SUFFIX
    zp_name = weight_name + "_zero_point"
    scale_name = weight_name + "_scale"
    count = [initializer.dims[axis]]
    scale_initializer = onnx.helper.make_tensor(scale_name, initializer.data_type, count, scale.tolist())
    zero_initializer = onnx.helper.make_tensor(zp_name, weight_qType, count, zero_point.tolist())
    self.model.initializer_extend([scale_initializer, zero_initializer])
    if not keep_float_weight:
        dtype = onnx.helper.tensor_dtype_to_np_dtype(weight_qType)
        q_weights = quantized.astype(dtype).reshape(initializer.dims)
        self.model.initializer_extend([onnx.numpy_helper.from_array(q_weights, q_weight_name)])
    calls["vectorized"] += 1
    return q_weight_name, zp_name, scale_name


def _scale_zero_point(
    rmin: np.ndarray,
    rmax: np.ndarray,
    qmin: np.ndarray,
    qmax: np.ndarray,
    symmetric: bool,
    min_real_range: float | None,
) -> tuple[np.ndarray, np.ndarray]:
    """quant_utils.compute_scale_zp over arrays of float32 channel ranges: (zero points in qmin's dtype,
    float32 scales)."""
    rmin = np.minimum(rmin, np.array(0, dtype=rmin.dtype))
    rmax = np.maximum(rmax, np.array(0, dtype=rmax.dtype))
    if min_real_range is not None:  # Python's max(rmax, floor): the floor only where it is greater
        floor = rmin + np.asarray(min_real_range, dtype=rmin.dtype)
        rmax = np.where(floor > rmax, floor, rmax)
    if symmetric:
        absmax = np.maximum(np.abs(rmin), np.abs(rmax))
        rmin, rmax = -absmax, +absmax
    dr = rmax.astype(np.float64) - rmin.astype(np.float64)  # promoted before subtracting, as ORT does
    dq = np.array(qmax, dtype=np.float64) - np.array(qmin, dtype=np.float64)
    scale = dr / dq
    degenerate = scale < np.finfo(rmax.dtype).tiny  # ORT: scale 1.0, zero point 0
    if symmetric:  # round((qmin + qmax) / 2.0), the same for every channel
        middle = np.array(np.round((qmin + qmax) / np.array(2.0, dtype=np.float64)), dtype=qmin.dtype)
        zero_point = np.full(scale.shape, middle, dtype=qmin.dtype)
    else:
        safe = np.where(degenerate, 1.0, scale)
        zero_point = np.round(qmin - rmin / safe).astype(qmin.dtype)
    zero_point[degenerate] = 0
    stored = scale.astype(rmax.dtype)
    stored[degenerate] = 1.0
    return zero_point, stored


def _fallback(
    self: Any,
    weight_name: str,
    weight_qType: int,
    channel_axis: int,
    reduce_range: bool,
    keep_float_weight: bool,
) -> tuple[str, str, str]:
    """ONNX Runtime's own method, for what `quantize_weight_per_channel_impl` does not handle."""
    from onnxruntime.quantization.base_quantizer import BaseQuantizer

    calls["onnxruntime"] += 1
    original = _original or BaseQuantizer.quantize_weight_per_channel_impl
    return original(self, weight_name, weight_qType, channel_axis, reduce_range, keep_float_weight)
