"""Activation ranges for symmetric INT8: run the fp32 ONNX in ONNX Runtime over the calibration set.

Every range is an `amax` (scale = amax / 127, zero point 0: TensorRT takes symmetric INT8 only), measured on
|x|. The calibrator makes two passes over the calibration set: the first finds each tensor's max |x|, the
second fills a histogram of |x| on [0, max] (`NUM_BINS` bins). The methods then choose amax from it:
- `max`: max |x|; no clipping, but one outlier stretches the scale for every other value;
- `percentile`: the `percentile`-th percentile of |x| (upper edge of the bin reaching it);
- `entropy`: TensorRT's KL-divergence calibration: the threshold whose 128-level quantized distribution is
  closest (KL) to the clipped original;
- `mse`: the threshold minimising the expected squared error of fake-quantization (rounding + clipping).
The graph is run with ONNX Runtime's optimizations off, on the unfused graph, so every tensor the Q/DQ pass
names exists and holds exactly the values the fp32 model computes.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from exporter import progress
from exporter.export.external_data import save_onnx
from exporter.quantize.calibration import CalibrationData

logger = logging.getLogger(__name__)

METHODS = ("max", "percentile", "entropy", "mse")
NUM_BINS = 2048
INT8_LEVELS = 128  # |q| in 0..127 for symmetric int8
DEFAULT_PERCENTILE = 99.99


def collect_ranges(
    model: onnx.ModelProto | str | Path,
    tensor_names: Iterable[str],
    data: CalibrationData,
    method: str = "percentile",
    percentile: float = DEFAULT_PERCENTILE,
    limit: int | None = None,
) -> dict[str, float]:
    """amax per tensor, by `method`, from the first `limit` calibration samples (all when None)."""
    if method not in METHODS:
        raise ValueError(f"unknown calibration method {method!r}; choose from {METHODS}")
    names = list(dict.fromkeys(tensor_names))
    if not names:
        return {}
    with tempfile.TemporaryDirectory() as tmp:
        session = _session_with_outputs(model, names, Path(tmp))
        amax = {n: 0.0 for n in names}
        for outputs in _passes(session, names, data, limit, "ranges: max"):
            for name, array in outputs.items():
                amax[name] = max(amax[name], _absmax(array))
        if method == "max":
            return amax
        hists = {n: np.zeros(NUM_BINS, dtype=np.int64) for n in names}
        for outputs in _passes(session, names, data, limit, f"ranges: {method}"):
            for name, array in outputs.items():
                hists[name] += np.histogram(np.abs(array), bins=NUM_BINS, range=(0.0, amax[name] or 1.0))[0]
    return {n: amax_from_histogram(hists[n], amax[n], method, percentile) for n in names}


def amax_from_histogram(
    hist: np.ndarray, max_abs: float, method: str, percentile: float = DEFAULT_PERCENTILE
) -> float:
    """Choose amax from a histogram of |x| with equal bins on [0, max_abs]."""
    if max_abs <= 0 or hist.sum() == 0:
        return float(max_abs)
    edges = np.linspace(0.0, max_abs, len(hist) + 1)
    if method == "max":
        return float(max_abs)
    if method == "percentile":
        return percentile_amax(hist, edges, percentile)
    if method == "entropy":
        return entropy_amax(hist, edges)
    if method == "mse":
        return mse_amax(hist, edges)
    raise ValueError(f"unknown calibration method {method!r}; choose from {METHODS}")


def percentile_amax(hist: np.ndarray, edges: np.ndarray, percentile: float) -> float:
    """Upper edge of the first bin where the cumulative count reaches `percentile` % of all values."""
    cdf = np.cumsum(hist) / hist.sum()
    index = int(np.searchsorted(cdf, percentile / 100.0))
    return float(edges[min(index + 1, len(edges) - 1)])


def entropy_amax(hist: np.ndarray, edges: np.ndarray, levels: int = INT8_LEVELS) -> float:
    """TensorRT's entropy calibration: the clip threshold minimising KL(P || Q).

    For each candidate i (bins kept), P is hist[:i] with the outliers' mass added to its last bin; Q merges
    hist[:i] into `levels` groups of i // levels bins (the last group takes the remainder) and spreads each
    group's mass evenly over its non-empty bins. Group sums come from cumulative sums (one pass per i).
    """
    hist = hist.astype(np.float64)
    cum, cum_nonzero = np.concatenate([[0.0], np.cumsum(hist)]), np.concatenate([[0], np.cumsum(hist > 0)])
    best_i, best_kl = len(hist), np.inf
    for i in range(levels, len(hist) + 1):
        size = i // levels
        starts = np.arange(levels) * size
        stops = np.append(starts[1:], i)
        group_mass, group_nonzero = cum[stops] - cum[starts], cum_nonzero[stops] - cum_nonzero[starts]
        group = np.minimum(np.arange(i) // size, levels - 1)
        q = np.where(hist[:i] > 0, group_mass[group] / np.maximum(group_nonzero[group], 1), 0.0)
        p = hist[:i].copy()
        p[-1] += cum[-1] - cum[i]
        kl = _kl(p, q)
        if kl < best_kl:
            best_kl, best_i = kl, i
    return float(edges[best_i])


def mse_amax(hist: np.ndarray, edges: np.ndarray, candidates: int = 512) -> float:
    """The threshold (among `candidates` bin edges) minimising E[(x - fakequant(x))^2] over the histogram."""
    centers = (edges[:-1] + edges[1:]) / 2
    counts = hist.astype(np.float64)
    thresholds = edges[np.unique(np.linspace(1, len(edges) - 1, candidates).astype(int))]
    scale = thresholds[:, None] / (INT8_LEVELS - 1)
    dequant = np.clip(np.round(centers[None, :] / scale), 0, INT8_LEVELS - 1) * scale
    error = ((centers[None, :] - dequant) ** 2 * counts[None, :]).sum(axis=1)
    return float(thresholds[int(np.argmin(error))])


def _kl(p: np.ndarray, q: np.ndarray) -> float:
    p = p / p.sum()
    q = q / q.sum()
    support = p > 0
    if np.any(q[support] == 0):
        return np.inf
    return float(np.sum(p[support] * np.log(p[support] / q[support])))


def _absmax(array: np.ndarray) -> float:
    return float(np.max(np.abs(array))) if array.size else 0.0


def _passes(session, names, data, limit, desc):  # type: ignore[no-untyped-def]
    """One pass over the calibration batches, yielding {tensor name: values} per batch."""
    batches, total = data.batches("calibration", limit), data.num_batches("calibration", limit)
    for feeds in progress.bar(batches, total=total, desc=desc, unit="batch"):
        yield dict(zip(names, session.run(names, _feeds_for(session, feeds)), strict=True))


def _feeds_for(session: ort.InferenceSession, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    wanted = {i.name for i in session.get_inputs()}
    return {k: v for k, v in feeds.items() if k in wanted}


def _session_with_outputs(
    model: onnx.ModelProto | str | Path, names: list[str], tmp: Path
) -> ort.InferenceSession:
    """An ORT session (optimizations off) whose outputs are the graph's outputs plus `names`."""
    proto = onnx.load(str(model)) if not isinstance(model, onnx.ModelProto) else _copy(model)
    existing = {o.name for o in proto.graph.output}
    for name in names:
        if name not in existing:
            proto.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    path = tmp / "calibrate.onnx"
    save_onnx(proto, path)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy


def channel_max(
    model: onnx.ModelProto,
    tensors: list[str],
    data: CalibrationData,
    tmp: Path,
    limit: int | None,
    desc: str = "channel max",
) -> dict[str, np.ndarray]:
    """max |x| per last-axis channel of each tensor over the calibration samples (used by the
    outlier-channel split and by SmoothQuant's scale migration)."""
    session = _session_with_outputs(model, tensors, tmp)
    result: dict[str, np.ndarray] = {}
    for outputs in _passes(session, tensors, data, limit, desc):
        for name, value in outputs.items():
            m = np.abs(value).reshape(-1, value.shape[-1]).max(axis=0)
            result[name] = np.maximum(result[name], m) if name in result else m
    return result


def cached_channel_max(
    cache: dict[tuple[str, str], np.ndarray] | None,
    path: Path,
    model: onnx.ModelProto,
    tensors: list[str],
    data: CalibrationData,
    tmp: Path,
    limit: int | None,
    desc: str = "channel max",
) -> dict[str, np.ndarray]:
    """`channel_max` of the model stored at `path`, measuring only the tensors `cache` lacks: SmoothQuant
    and the CPU file's outlier split ask for the same MatMul inputs of the same fp32 file (a whole pass
    over the calibration set each)."""
    if cache is None:
        return channel_max(model, tensors, data, tmp, limit, desc)
    key = str(Path(path).resolve())
    missing = [t for t in tensors if (key, t) not in cache]
    if missing:
        for name, value in channel_max(model, missing, data, tmp, limit, desc).items():
            cache[(key, name)] = value
    return {t: cache[(key, t)] for t in tensors}
