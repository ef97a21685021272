"""Activation ranges for symmetric INT8: run the fp32 ONNX in ONNX Runtime over the calibration set.

Every range is an `amax` (scale = amax / 127, zero point 0: TensorRT takes symmetric INT8 only), measured on
|x|. The calibrator makes two passes over the calibration set: the first finds each tensor's max |x|, the
second fills a histogram of |x| on [0, max] (`NUM_BINS` bins). The methods then choose amax from it:
- `max`: max |x|; no clipping, but one outlier stretches the scale for every other value;
- `percentile`: the `percentile`-th percentile of |x| (upper edge of the bin reaching it);
- `entropy`: TensorRT's KL-divergence calibration: the threshold whose 128-level quantized distribution is
  closest (KL) to the clipped original;
- `mse`: the threshold minimising the expected squared error of fake-quantization (rounding + clipping).
The histogram's bins need the max first, so the second pass normally runs the calibration set again; where the
first pass's values fit in memory (`KEEP_FRACTION` of what is available, at most `KEEP_MAX_BYTES`) they are kept
and the histogram is filled from them instead: the same arrays, the same counts, one ONNX Runtime pass instead of
two (45M-parameter Llama of tools/bench_decoder.py: 2.9 GB kept, a 4.5 s pass saved; `KeptValues`).
Every pass reads real tokens only (`_passes`): padded positions feed no real token's output, the held-out judge
and the INT4 stage's activations ignore them, and with text padded to the sequence length they were most of the
values (the demo's corpus: ~40 of 128 tokens real), so they shaped the histograms that choose each amax.
Measured before/after (`tools/bench_int8.py --methods`: all-MiniLM-L6-v2, every layer INT8, held-out cosine): mse
0.9767 -> 0.9804, max 0.9706 -> 0.9702; the demo export's final held-out cosine 0.9923 -> 0.9945; the 45M
Llama's calibration pass computes 10.9k tokens instead of 16.4k.
The graph is run with ONNX Runtime's optimizations off, on the unfused graph, so every tensor the Q/DQ pass
names exists and holds exactly the values the fp32 model computes. The calibration graph computes only what
the measured tensors depend on: ONNX Runtime runs every node of a graph whatever outputs are fetched, and a
decoder's LM head (the [hidden, vocabulary] MatMul, ~40% of a 45M-parameter Llama's work) feeds no tensor
that needs a range (measured on tools/bench_decoder.py's model: 5.5 -> 3.3 s per pass over 128 samples).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
import tempfile
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from exporter import progress
from exporter.export.external_data import one_file_bytes, save_onnx
from exporter.quantize.calibration import CalibrationData
from exporter.quantize.repeats import Fetch, Repeated, Values

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
    amax: dict[str, float] | None = None,
    session: ort.InferenceSession | None = None,
    values: dict[str, list[Values]] | None = None,
) -> dict[str, float]:
    """amax per tensor, by `method`, from the first `limit` calibration samples (all when None). `amax`: max |x|
    per tensor already measured on the same model and samples (exporter/quantize/int8.py takes it from the
    channel maxima SmoothQuant measured): the first pass runs only for the tensors it lacks. `session`: a
    calibration session of the same model whose outputs include every tensor (the one that measured `amax`:
    `Maxima.take_session`), used instead of building another. `values`: those tensors' per-batch arrays from
    that same pass (`Maxima.take_values`; taken: the lists are emptied as they are counted), histogrammed
    instead of running the set again. A first pass keeps what it measures when it fits (`KeptValues`).
    A tensor that repeats another's values (a GQA decoder's K^T and V) is measured on its source, its counts
    weighted by the copies (exporter/quantize/repeats.py): the same ranges."""
    if method not in METHODS:
        raise ValueError(f"unknown calibration method {method!r}; choose from {METHODS}")
    names = list(dict.fromkeys(tensor_names))
    if not names:
        return {}
    known = {n: float((amax or {})[n]) for n in names if n in (amax or {})}
    amax = {n: known.get(n, 0.0) for n in names}
    missing = [n for n in names if n not in known]
    if method == "max" and not missing:
        return amax
    kept = {n: values[n] for n in names if n in known and values is not None and n in values}
    hists = {n: np.zeros(NUM_BINS, dtype=np.int64) for n in names}
    with tempfile.TemporaryDirectory() as tmp:
        proto = onnx.load(str(model)) if not isinstance(model, onnx.ModelProto) else model
        rest = [n for n in names if n not in kept]  # the histogram needs these from ONNX Runtime
        if missing:
            # the max pass: also keeps the values of every tensor the histogram still needs, where they fit
            fetch = Fetch.plan(proto, missing if method == "max" else rest)
            session = _session_with_outputs(proto, fetch.outputs, Path(tmp))
            keep = KeptValues(rest, data.num_batches("calibration", limit)) if method != "max" else None
            for outputs in _passes(session, fetch, data, limit, "ranges: max"):
                for name in missing:
                    amax[name] = max(amax[name], _absmax(outputs[name]))
                if keep is not None:
                    keep.add(outputs)
            if method == "max":
                return amax
            assert keep is not None
            kept.update(keep.arrays)
            rest = [n for n in names if n not in kept]
            if keep.dropped:
                logger.info(
                    "calibration values not kept (%s): a second pass fills the histograms", keep.dropped
                )
        fetch = Fetch.plan(proto, rest)  # (after a max pass: a part of its session's outputs)
        if rest and (session is None or not set(fetch.outputs) <= {o.name for o in session.get_outputs()}):
            session = _session_with_outputs(proto, fetch.outputs, Path(tmp))
        for name in kept:
            arrays = kept[name]
            while arrays:  # counted and let go batch by batch
                hists[name] += _histogram(arrays.pop(), amax[name] or 1.0)

        def count(outputs: dict[str, Values]) -> None:
            for name, array in outputs.items():
                hists[name] += _histogram(array, amax[name] or 1.0)

        # one batch's histograms run beside ONNX Runtime's next batch (integer counts: the same sums)
        with ThreadPoolExecutor(1) if HISTOGRAM_THREAD and rest else contextlib.nullcontext() as pool:
            pending: Future[None] | None = None
            for outputs in _passes(session, fetch, data, limit, f"ranges: {method}") if rest else ():
                if pool is None:
                    count(outputs)
                    continue
                if pending is not None:
                    pending.result()
                pending = pool.submit(count, outputs)
            if pending is not None:
                pending.result()
    return {n: amax_from_histogram(hists[n], amax[n], method, percentile) for n in names}


# A pass's values are kept for the histogram while the projected total fits this share of the memory available
# when the pass starts, and at most `KEEP_MAX_BYTES` (the 45M Llama keeps 2.9 GB; a 1B model's ~20 GB would not
# fit: it runs the second pass, as every model did before).
KEEP_FRACTION = 0.25
KEEP_MAX_BYTES = 8 * 2**30


class KeptValues:
    """Per-batch arrays of `names` from one pass over `batches` batches, kept while the projection (bytes so far
    per batch x batches) fits the budget; once it does not, everything kept is let go and `dropped` says why.
    The arrays are the ones ONNX Runtime returned (each run's outputs are new arrays: nothing is copied; their
    pages are new, ~770k minor faults for the 45M Llama's 2.9 GB, +0.8 s on a 3.7 s pass: copying them into
    memory mapped with MAP_POPULATE measured slower, +1.9 s). An array several tensors hold (`Repeated`) counts
    once."""

    def __init__(self, names: Sequence[str], batches: int, budget: int | None = None) -> None:
        self.arrays: dict[str, list[Values]] = {n: [] for n in names}
        self.batches = max(batches, 1)
        self.budget = keep_budget() if budget is None else budget
        self.bytes = 0
        self.seen = 0
        self.dropped: str | None = None if self.arrays else "nothing to keep"

    def add(self, outputs: dict[str, Values]) -> None:
        if self.dropped is not None:
            return
        held = {id(a): a.nbytes for a in (_array(outputs[n]) for n in self.arrays)}
        self.bytes += sum(held.values())
        self.seen += 1
        projected = self.bytes * max(self.batches, self.seen) // self.seen
        if projected > self.budget:
            self.arrays = {}
            self.dropped = f"projected {projected / 2**30:.1f} GiB > budget {self.budget / 2**30:.1f} GiB"
            return
        for name, arrays in self.arrays.items():
            arrays.append(outputs[name])


def keep_budget() -> int:
    """Bytes a pass may keep: `KEEP_FRACTION` of the memory available now (Linux's MemAvailable, else the free
    physical pages), at most `KEEP_MAX_BYTES`; 0 where neither can be read (nothing kept)."""
    available = 0
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
                    break
    except OSError:
        with contextlib.suppress(ValueError, OSError, AttributeError):
            available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return min(int(available * KEEP_FRACTION), KEEP_MAX_BYTES)


# Values per block of `abs_histogram` (float32 work arrays of 1 MiB: cache-resident between its steps).
HISTOGRAM_BLOCK = 2**18
EDGE_MARGIN = np.float32(1e-3)
# The histogram pass counts one batch in a worker thread while ONNX Runtime computes the next.
HISTOGRAM_THREAD = True


def abs_histogram(values: np.ndarray, high: float, bins: int = NUM_BINS) -> np.ndarray:
    """Exactly `np.histogram(np.abs(values), bins=bins, range=(0.0, high))[0]` (int64 counts), ~2x faster on
    float32.

    numpy's uniform-bin histogram estimates each value's bin in float64, corrects the estimate by one against
    its edges (`np.linspace(0, high, bins + 1)` in the data's dtype: float32) and counts with `np.bincount`: the
    counts are "how many values lie in [edge k, edge k + 1)" (the last bin closed), whatever the estimate.
    Here the estimate is p = |x| * (bins / high) in float32, whose floor is that bin unless p lies within
    `EDGE_MARGIN` of an integer (its error and the edges' float32 rounding are both < 1e-3 of a bin: 2^-22
    relative at p <= bins = 2048); those few values (~0.2%; zeros, as a causal mask's attention weights,
    are exact: edge 0 is 0) are moved to their bin among numpy's own float32 edges (`np.searchsorted`: the bin
    numpy's one-step correction gives, as its estimate is never more than one bin off).
    Work arrays are cache-sized blocks. Anything else (other dtypes, a range whose bins float32 cannot
    separate, a block holding NaN or values beyond `high`, which numpy drops) goes through numpy itself."""
    flat = values.reshape(-1)
    factor = np.float32(bins / high) if 0.0 < high < np.inf else np.float32(0.0)
    edges = _float32_edges(high, bins) if factor else None
    if (
        edges is None
        or bins > 4096  # the margin's error bound holds for p <= 4096
        or np.result_type(0.0, high, flat) != np.float32  # numpy's own edge dtype for these arguments
        or not np.isfinite(factor)
        or high < np.finfo(np.float32).tiny * bins * 4  # sub-normal bin widths: no error bound
        or np.any(edges[:-1] >= edges[1:])
    ):
        return np.histogram(np.abs(flat), bins=bins, range=(0.0, high))[0]
    counts = np.zeros(bins + 1, dtype=np.int64)  # + 1: p = bins (|x| = high) is near an edge, moved back
    size = min(HISTOGRAM_BLOCK, flat.size)
    work, floor, index = np.empty(size, np.float32), np.empty(size, np.float32), np.empty(size, np.intp)
    near, far = np.empty(size, bool), np.empty(size, bool)
    for start in range(0, flat.size, HISTOGRAM_BLOCK):
        block = flat[start : start + HISTOGRAM_BLOCK]
        n = block.size
        a, p, fl, i, m, f = block, work[:n], floor[:n], index[:n], near[:n], far[:n]
        np.abs(block, out=p)
        if not p.max() <= high:  # NaN, or values beyond the range (numpy drops them)
            counts[:bins] += np.histogram(p, bins=bins, range=(0.0, high))[0]
            continue
        np.multiply(p, factor, out=p)
        np.floor(p, out=fl)
        np.subtract(p, fl, out=p)  # the fraction of a bin: near 0 or 1 = near an edge
        np.less(p, EDGE_MARGIN, out=m)
        np.greater_equal(fl, 1.0, out=f)  # edge 0 is exact (|x| >= 0): zeros and small values stay in bin 0
        np.logical_and(m, f, out=m)
        np.greater(p, np.float32(1.0 - EDGE_MARGIN), out=f)
        np.logical_or(m, f, out=m)
        i[...] = fl
        counts += np.bincount(i, minlength=bins + 1)
        moved = np.flatnonzero(m)
        if moved.size:
            # [edge k, edge k + 1) is bin k; |x| = high (the last edge) belongs to the last bin
            exact = np.minimum(np.searchsorted(edges, np.abs(a[moved]), side="right") - 1, bins - 1)
            counts -= np.bincount(i[moved], minlength=bins + 1)
            counts[:bins] += np.bincount(exact, minlength=bins)
    return counts[:bins]


@functools.lru_cache(maxsize=256)
def _float32_edges(high: float, bins: int) -> np.ndarray:
    """numpy's histogram edges for float32 data on [0, high] (`np.linspace` in float32), computed once per
    range: every batch of a tensor is counted against the same edges (thousands of calls per export)."""
    edges = np.linspace(0.0, high, bins + 1, dtype=np.float32)
    edges.flags.writeable = False
    return edges


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


def _absmax(values: Values) -> float:
    if isinstance(values, Repeated):  # no copies: an empty tensor
        return _absmax(values.values) if values.copies else 0.0
    return float(np.max(np.abs(values))) if values.size else 0.0


def _histogram(values: Values, high: float) -> np.ndarray:
    """`abs_histogram` of the tensor's values: a repeated tensor's are its source's counts times the copies."""
    if isinstance(values, Repeated):
        return abs_histogram(values.values, high) * values.copies
    return abs_histogram(values, high)


def _array(values: Values) -> np.ndarray:
    return values.values if isinstance(values, Repeated) else values


def _passes(session, fetch, data, limit, desc):  # type: ignore[no-untyped-def]
    """One pass over the calibration batches, yielding {tensor name: values} per batch (`Fetch.batch`: a
    repeated tensor as its source's array and copies): real tokens only (`CalibrationData.judge_batches`,
    batches of the export's batch size sorted by length and cut to the columns holding a real token), as the
    held-out judge reads them."""
    batches = data.judge_batches("calibration", limit, data.batch)
    total = len(batches)
    outputs = fetch.outputs
    for feeds in progress.bar(batches, total=total, desc=desc, unit="batch"):
        yield fetch.batch(dict(zip(outputs, session.run(outputs, _feeds_for(session, feeds)), strict=True)))


def _feeds_for(session: ort.InferenceSession, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    wanted = {i.name for i in session.get_inputs()}
    return {k: v for k, v in feeds.items() if k in wanted}


def _session_with_outputs(
    model: onnx.ModelProto | str | Path, names: list[str], tmp: Path
) -> ort.InferenceSession:
    """An ORT session (optimizations off) whose outputs are `names`, computing only what they depend on. Built
    from the pruned graph's bytes (the 45M Llama's 221 MB: 0.5 s of writing calibrate.onnx saved), or from a
    file with external data where the graph is over protobuf's limit."""
    proto = onnx.load(str(model)) if not isinstance(model, onnx.ModelProto) else model
    pruned = needed_for(proto, names)
    source: str | bytes | None = one_file_bytes(pruned)
    if source is None:
        source = str(save_onnx(pruned, tmp / "calibrate.onnx"))
    del pruned
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def needed_for(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """A new model (`model` untouched) whose outputs are `names` and whose nodes and initializers are only
    those the outputs depend on; every graph input stays (feeds are filtered by the session's inputs). An
    output without a value_info gets no type: ONNX Runtime infers it (an activation's float, an Expand shape's
    int64: `Fetch`)."""
    graph = model.graph
    needed = set(names)
    kept = []
    for node in reversed(graph.node):
        if any(output in needed for output in node.output):
            kept.append(node)
            needed.update(node.input)
            needed.update(_subgraph_inputs(node))
    known = {v.name: v for v in [*graph.input, *graph.value_info, *graph.output]}
    outputs = [known[n] if n in known else onnx.helper.make_value_info(n, onnx.TypeProto()) for n in names]
    pruned = onnx.helper.make_graph(
        list(reversed(kept)),
        graph.name,
        list(graph.input),
        outputs,
        [i for i in graph.initializer if i.name in needed],
        sparse_initializer=[i for i in graph.sparse_initializer if i.values.name in needed],
        value_info=list(graph.value_info),
    )
    return onnx.helper.make_model(
        pruned, ir_version=model.ir_version, opset_imports=model.opset_import, functions=model.functions
    )


def _subgraph_inputs(node: onnx.NodeProto) -> set[str]:
    """Every name the node's subgraphs (If / Loop / Scan bodies) read: outer-scope values they may capture."""
    names: set[str] = set()
    for attribute in node.attribute:
        for graph in [attribute.g] if attribute.HasField("g") else list(attribute.graphs):
            for inner in graph.node:
                names.update(inner.input)
                names.update(_subgraph_inputs(inner))
    return names


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
    return measure_maxima(model, tensors, [], data, tmp, limit, desc)[0]


def measure_maxima(
    model: onnx.ModelProto,
    channels: list[str],
    whole: list[str],
    data: CalibrationData,
    tmp: Path,
    limit: int | None,
    desc: str,
    session: ort.InferenceSession | None = None,
    keep: KeptValues | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """One pass over the calibration samples: max |x| per last-axis channel of each of `channels`, and max |x|
    of each of `whole` (any shapes: a decoder's attention scores grow along their last axis with the decode
    steps). `session`: the calibration session to run (its outputs: `_maxima_fetch`'s; built when None).
    `keep`: takes each batch's outputs (the values of its tensors, for a histogram without a second pass)."""
    fetch = _maxima_fetch(model, channels, whole)
    per_channel, overall = set(channels), set(whole)
    result: dict[str, np.ndarray] = {}
    amax = {n: 0.0 for n in whole}
    session = session or _session_with_outputs(model, fetch.outputs, tmp)
    for outputs in _passes(session, fetch, data, limit, desc):
        if keep is not None:
            keep.add(outputs)
        for name, value in outputs.items():
            if name not in per_channel:
                amax[name] = max(amax[name], _absmax(value))
                continue
            assert isinstance(value, np.ndarray)  # (`_maxima_fetch`: read directly)
            if value.size == 0:  # (|x| >= 0: zeros change no maximum)
                m = np.zeros(value.shape[-1] if value.ndim else 1, dtype=value.dtype)
            else:
                m = np.abs(value).reshape(-1, value.shape[-1] if value.ndim else 1).max(axis=0)
            result[name] = np.maximum(result[name], m) if name in result else m
            if name in overall:  # the max of the channel maxima: exactly max |x|
                amax[name] = max(amax[name], float(m.max()) if m.size else 0.0)
    return result, amax


def _maxima_fetch(model: onnx.ModelProto, channels: list[str], whole: list[str]) -> Fetch:
    """`whole` tensors that repeat another's values are read through their source (max |x| and kept values:
    `Repeated`); the `channels` tensors themselves (a maximum per channel needs their own arrays)."""
    return Fetch.plan(model, [*channels, *whole], direct=channels)


@dataclasses.dataclass
class Maxima:
    """Maxima measured once per (model file, tensor) over the calibration samples: per channel (SmoothQuant
    and the CPU file's outlier split ask for the same MatMul inputs of the same fp32 file) and max |x| (the
    Q/DQ ranges' first pass, measured in SmoothQuant's pass: exporter/quantize/int8.py)."""

    channels: dict[tuple[str, str], np.ndarray] = dataclasses.field(default_factory=dict)
    whole: dict[tuple[str, str], float] = dataclasses.field(default_factory=dict)
    # the last calibration session per model file: the Q/DQ ranges' histogram pass reuses SmoothQuant's
    sessions: dict[str, ort.InferenceSession] = dataclasses.field(default_factory=dict)
    # the `whole` tensors' values from that pass, where they fit (`KeptValues`): the histogram needs no pass
    values: dict[str, dict[str, list[Values]]] = dataclasses.field(default_factory=dict)

    def take_session(self, path: Path) -> ort.InferenceSession | None:
        """The calibration session kept for the model at `path` (handed over: the cache lets go of it)."""
        return self.sessions.pop(_key(path), None)

    def take_values(self, path: Path) -> dict[str, list[Values]]:
        """The values kept from the pass on the model at `path` (handed over). Every file's values are let go:
        they serve one histogram (those of a file that was not calibrated, e.g. fp32 before smoothing, no one)."""
        values, self.values = self.values, {}
        return values.get(_key(path), {})

    def absmax(self, path: Path, tensors: list[str]) -> dict[str, float]:
        """max |x| of those of `tensors` measured on the model at `path`."""
        key = _key(path)
        return {t: self.whole[(key, t)] for t in tensors if (key, t) in self.whole}


def cached_channel_max(
    cache: Maxima | None,
    path: Path,
    model: onnx.ModelProto,
    tensors: list[str],
    data: CalibrationData,
    tmp: Path,
    limit: int | None,
    desc: str = "channel max",
    whole: Sequence[str] = (),
) -> dict[str, np.ndarray]:
    """`channel_max` of the model stored at `path`, measuring only the tensors `cache` lacks; `whole`: tensors
    whose max |x| goes into `cache` from the same pass (a whole pass over the calibration set each), and whose
    values it keeps where they fit (`Maxima.take_values`: the Q/DQ ranges' histogram without a second pass)."""
    if cache is None:
        return channel_max(model, tensors, data, tmp, limit, desc)
    key = _key(path)
    missing = [t for t in tensors if (key, t) not in cache.channels]
    missing_whole = [t for t in whole if (key, t) not in cache.whole]
    if missing or missing_whole:
        outputs = _maxima_fetch(model, missing, missing_whole).outputs
        cache.sessions[key] = session = _session_with_outputs(model, outputs, tmp)
        keep = KeptValues(missing_whole, data.num_batches("calibration", limit)) if missing_whole else None
        channels, amax = measure_maxima(model, missing, missing_whole, data, tmp, limit, desc, session, keep)
        cache.channels.update({(key, name): value for name, value in channels.items()})
        cache.whole.update({(key, name): value for name, value in amax.items()})
        if keep is not None and keep.dropped is None:
            cache.values[key] = keep.arrays
    return {t: cache.channels[(key, t)] for t in tensors}


def _key(path: Path) -> str:
    return str(Path(path).resolve())
