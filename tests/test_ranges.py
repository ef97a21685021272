"""Range collection and each calibration method against a straightforward numpy reference on seeded data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from exporter.quantize.calibration import CalibrationData
from exporter.quantize.ranges import (
    INT8_LEVELS,
    METHODS,
    NUM_BINS,
    amax_from_histogram,
    collect_ranges,
    entropy_amax,
    mse_amax,
    percentile_amax,
)


def _outlier_data(seed: int = 0, size: int = 200_000) -> np.ndarray:
    """Gaussian bulk plus a few large outliers: the case where the methods must differ."""
    rng = np.random.default_rng(seed)
    data = rng.normal(0, 1, size)
    data[rng.choice(size, 20, replace=False)] = rng.uniform(20, 40, 20)
    return data.astype(np.float32)


def _hist(data: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    max_abs = float(np.abs(data).max())
    hist, edges = np.histogram(np.abs(data), bins=NUM_BINS, range=(0, max_abs))
    return hist, edges, max_abs


def _fake_quant_mse(data: np.ndarray, amax: float) -> float:
    scale = amax / (INT8_LEVELS - 1)
    return float(np.mean((data - np.clip(np.round(data / scale), -127, 127) * scale) ** 2))


def test_percentile_matches_numpy_within_one_bin() -> None:
    data = _outlier_data()
    hist, edges, _ = _hist(data)
    for p in (99.0, 99.9, 99.99):
        expected = np.percentile(np.abs(data), p)
        got = percentile_amax(hist, edges, p)
        assert expected <= got <= expected + 2 * (edges[1] - edges[0]), (p, got, expected)


def test_mse_matches_brute_force_on_raw_values() -> None:
    data = _outlier_data()
    hist, edges, max_abs = _hist(data)
    got = mse_amax(hist, edges)
    grid = np.linspace(max_abs / 200, max_abs, 400)
    errors = [_fake_quant_mse(data, t) for t in grid]
    best = grid[int(np.argmin(errors))]
    assert _fake_quant_mse(data, got) <= min(errors) * 1.02, (got, best)


def _entropy_reference(hist: np.ndarray, edges: np.ndarray, levels: int = INT8_LEVELS) -> float:
    """TensorRT's entropy calibration written out bin by bin (no vectorisation)."""
    best_kl, best_i = float("inf"), len(hist)
    for i in range(levels, len(hist) + 1):
        reference = [float(v) for v in hist[:i]]
        reference[-1] += float(hist[i:].sum())
        candidate = [0.0] * i
        size = i // levels  # TensorRT: equal groups, the last one takes the remainder
        for j in range(levels):
            lo, hi = j * size, (j + 1) * size if j < levels - 1 else i
            nonzero = [k for k in range(lo, hi) if hist[k] > 0]
            for k in nonzero:
                candidate[k] = float(hist[lo:hi].sum()) / len(nonzero)
        p_sum, q_sum = sum(reference), sum(candidate)
        kl = 0.0
        for p, q in zip(reference, candidate, strict=True):
            if p > 0:
                kl = float("inf") if q == 0 else kl + p / p_sum * np.log((p / p_sum) / (q / q_sum))
        if kl < best_kl:
            best_kl, best_i = kl, i
    return float(edges[best_i])


def test_entropy_matches_reference_implementation() -> None:
    data = _outlier_data()
    hist, edges = np.histogram(np.abs(data), bins=256, range=(0, float(np.abs(data).max())))
    got = entropy_amax(hist, edges, levels=32)
    expected = _entropy_reference(hist, edges, levels=32)
    assert abs(got - expected) <= (edges[1] - edges[0]) + 1e-6, (got, expected)
    assert got < 0.75 * float(np.abs(data).max())  # clips most outliers


def test_max_is_max_abs() -> None:
    data = _outlier_data()
    hist, _, max_abs = _hist(data)
    assert amax_from_histogram(hist, max_abs, "max") == max_abs


def _relu_model() -> onnx.ModelProto:
    graph = helper.make_graph(
        [helper.make_node("Neg", ["x"], ["n"]), helper.make_node("Relu", ["n"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 64])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@pytest.mark.parametrize("method", ["max", "percentile", "entropy", "mse"])
def test_collect_ranges_over_batches_equals_numpy_on_all_samples(method: str) -> None:
    x = _outlier_data(size=64 * 50).reshape(50, 64)
    data = CalibrationData({"x": x}, {"x": x[:2]}, batch=8, source="test")
    ranges = collect_ranges(_relu_model(), ["n", "y"], data, method=method)
    for name, values in (("n", -x), ("y", np.maximum(-x, 0))):
        max_abs = float(np.abs(values).max())
        hist = np.histogram(np.abs(values), bins=NUM_BINS, range=(0, max_abs))[0]
        assert ranges[name] == pytest.approx(amax_from_histogram(hist, max_abs, method), rel=1e-6), name


def test_collect_ranges_respects_limit() -> None:
    x = np.ones((20, 64), np.float32)
    x[10:] *= 5
    data = CalibrationData({"x": x}, {"x": x[:1]}, batch=4, source="test")
    assert collect_ranges(_relu_model(), ["n"], data, method="max", limit=8)["n"] == 1.0
    assert collect_ranges(_relu_model(), ["n"], data, method="max")["n"] == 5.0


def test_unknown_method_is_rejected() -> None:
    data = CalibrationData({"x": np.ones((2, 64), np.float32)}, {}, batch=1, source="test")
    with pytest.raises(ValueError, match="unknown calibration method"):
        collect_ranges(_relu_model(), ["n"], data, method="kl")


def _relu_model_with_head() -> onnx.ModelProto:
    """x -> Neg n -> Relu y -> MatMul (a 'head' nobody calibrates) -> z (the graph output); k: dynamic width."""
    head = helper.make_tensor("head", TensorProto.FLOAT, [64, 3], np.ones(64 * 3, np.float32).tolist())
    graph = helper.make_graph(
        [
            helper.make_node("Neg", ["x"], ["n"]),
            helper.make_node("Relu", ["n"], ["y"]),
            helper.make_node("MatMul", ["y", "head"], ["z"]),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 64])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, ["b", 3])],
        [head],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_calibration_graph_holds_only_what_the_measured_tensors_need() -> None:
    from exporter.quantize.ranges import needed_for

    model = _relu_model_with_head()
    pruned = needed_for(model, ["n"])
    assert [n.op_type for n in pruned.graph.node] == ["Neg"]
    assert [o.name for o in pruned.graph.output] == ["n"] and not pruned.graph.initializer
    assert [n.op_type for n in needed_for(model, ["y", "n"]).graph.node] == ["Neg", "Relu"]
    assert len(model.graph.node) == 3 and model.graph.initializer  # the model itself is untouched


@pytest.mark.parametrize("method", ["max", "mse"])
def test_known_amax_replaces_the_first_pass(
    method: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """SmoothQuant's pass hands the ranges their max |x|: the same ranges with one pass fewer."""
    from exporter.quantize import ranges as ranges_module

    x = _outlier_data(size=64 * 50).reshape(50, 64)
    data = CalibrationData({"x": x}, {"x": x[:2]}, batch=8, source="test")
    model = _relu_model_with_head()
    measured = collect_ranges(model, ["n", "y"], data, method=method)
    channels, amax = ranges_module.measure_maxima(model, ["y"], ["n", "y"], data, tmp_path, None, "t")
    assert amax == {"n": float(np.abs(x).max()), "y": float(np.maximum(-x, 0).max())}
    assert channels["y"].tolist() == np.maximum(-x, 0).max(axis=0).tolist()
    passes = []
    original = ranges_module._passes
    monkeypatch.setattr(ranges_module, "_passes", lambda *a: passes.append(a[-1]) or original(*a))
    assert collect_ranges(model, ["n", "y"], data, method=method, amax=amax) == measured
    assert passes == ([] if method == "max" else [f"ranges: {method}"])
    passes.clear()  # only the tensors without a known amax get a first pass, which keeps the values it ran
    assert collect_ranges(model, ["n", "y"], data, method=method, amax={"n": amax["n"]}) == measured
    assert passes == ["ranges: max"]
    passes.clear()  # values that do not fit the budget are let go: a second pass fills the histograms
    monkeypatch.setattr(ranges_module, "KEEP_MAX_BYTES", 0)
    assert collect_ranges(model, ["n", "y"], data, method=method, amax={"n": amax["n"]}) == measured
    assert passes == ["ranges: max"] + ([] if method == "max" else [f"ranges: {method}"])
    wrong = collect_ranges(model, ["n"], data, method="max", amax={"n": 123.0})
    assert wrong == {"n": 123.0}  # the given maxima are used as they are


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("budget", [None, 0, 3000])
def test_values_kept_from_the_maxima_pass_give_the_same_ranges_without_a_pass(
    method: str, budget: int | None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """SmoothQuant's pass keeps the Q/DQ tensors' values (where they fit): the histogram comes from them, bit
    for bit the ranges of two passes. Over the budget (0 bytes; or 3000, less than the 7 batches' 28 KB)
    nothing is kept and the histogram pass runs as before."""
    from exporter.quantize import ranges as ranges_module

    x = _outlier_data(size=64 * 50).reshape(50, 64)
    data = CalibrationData({"x": x}, {"x": x[:2]}, batch=8, source="test")
    model = _relu_model_with_head()
    measured = collect_ranges(model, ["n", "y"], data, method=method)
    if budget is not None:
        monkeypatch.setattr(ranges_module, "KEEP_MAX_BYTES", budget)
    cache, path = ranges_module.Maxima(), tmp_path / "m.onnx"
    ranges_module.cached_channel_max(cache, path, model, ["y"], data, tmp_path, None, "t", whole=["n", "y"])
    passes = []
    original = ranges_module._passes
    monkeypatch.setattr(ranges_module, "_passes", lambda *a: passes.append(a[-1]) or original(*a))
    values = cache.take_values(path)
    assert cache.values == {}  # handed over
    assert (set(values) == {"n", "y"}) == (budget is None)
    if values:
        assert [len(v) for v in values.values()] == [7, 7]
    amax = cache.absmax(path, ["n", "y"])
    got = collect_ranges(model, ["n", "y"], data, method, amax=amax, values=values)
    assert got == measured
    assert passes == ([] if budget is None or method == "max" else [f"ranges: {method}"])
    assert method == "max" or all(not v for v in values.values())  # counted and let go (max: not needed)


def test_kept_values_drop_everything_once_the_projection_exceeds_the_budget() -> None:
    from exporter.quantize.ranges import KeptValues

    keep = KeptValues(["a"], batches=4, budget=4 * 400)
    keep.add({"a": np.zeros(100, np.float32), "b": np.zeros(10**6, np.float32)})  # only `a` is counted
    assert keep.dropped is None and len(keep.arrays["a"]) == 1
    keep.add({"a": np.zeros(101, np.float32)})  # projected 4 x 402 bytes > 1600
    assert keep.arrays == {} and "budget" in (keep.dropped or "")
    keep.add({"a": np.zeros(1, np.float32)})
    assert keep.arrays == {}


def test_whole_tensor_maxima_take_any_shapes(tmp_path: Path) -> None:
    """Decode steps grow the attention scores' last axis: max |x| of such a tensor needs no fixed width."""
    from exporter.quantize.ranges import measure_maxima

    graph = helper.make_graph(
        [helper.make_node("Neg", ["x"], ["n"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "k"])],
        [helper.make_tensor_value_info("n", TensorProto.FLOAT, ["b", "k"])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    rng = np.random.default_rng(3)
    main, step = rng.normal(size=(6, 4)).astype(np.float32), rng.normal(size=(6, 5)).astype(np.float32) * 9
    data = CalibrationData(
        {"x": main}, {"x": main[:1]}, batch=2, source="test", groups={"calibration": [{"x": step}]}
    )
    _, amax = measure_maxima(model, [], ["n"], data, tmp_path, None, "t")
    assert amax == {"n": float(np.abs(step).max())}


@pytest.mark.parametrize("seed", range(6))
def test_abs_histogram_equals_numpy_bit_for_bit(seed: int) -> None:
    """The calibration histogram equals np.histogram(np.abs(x), NUM_BINS, (0, high)) exactly: values on and
    one ulp beside every float32 edge, zeros and values below the first edge, a range below the max (values dropped), NaN/inf, a `high` float32
    cannot hold, tiny and huge scales, several blocks."""
    from exporter.quantize.ranges import HISTOGRAM_BLOCK, abs_histogram

    rng = np.random.default_rng(seed)
    n = HISTOGRAM_BLOCK * 2 + 12345
    x = (rng.standard_normal(n) * 10.0 ** rng.uniform(-30, 30)).astype(np.float32)
    high = float(np.abs(x).max())
    edges = np.linspace(0.0, high, NUM_BINS + 1, dtype=np.float32)
    on_edges = edges[rng.integers(0, NUM_BINS + 1, n)]
    beside = np.nextafter(on_edges, np.where(rng.random(n) < 0.5, np.inf, -np.inf).astype(np.float32))
    x[: n // 2] = np.minimum(np.where(rng.random(n) < 0.5, on_edges, beside), edges[-1])[: n // 2]
    x *= np.where(rng.random(n) < 0.5, 1, -1).astype(np.float32)
    x[n // 2 : n // 2 + 5000] = 0.0  # zeros (a causal mask's attention weights) and values near edge 1
    x[n // 2 + 5000 : n // 2 + 6000] = np.nextafter(edges[1], np.float32(0)) * rng.random(1000).astype(
        np.float32
    )
    cases = [(x, high), (x, high * 0.7), (x, high * (1 + 1e-9)), (x[: n - n % 3].reshape(-1, 3)[:, :2], high)]
    with_nan = x.copy()
    with_nan[[5, HISTOGRAM_BLOCK + 9]] = [np.nan, np.inf]
    cases += [(with_nan, high), (x[:100], 1.0), (np.zeros(10, np.float32), 1.0), (x.astype(np.float64), high)]
    for values, top in cases:
        want = np.histogram(np.abs(values), bins=NUM_BINS, range=(0.0, top))[0]
        got = abs_histogram(values, top)
        assert got.dtype == want.dtype and np.array_equal(got, want), (seed, top)


@pytest.mark.parametrize("threaded", [True, False])
def test_histogram_pass_equals_numpy_histograms_exactly(
    threaded: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The histogram pass (counting in a worker thread beside ONNX Runtime's next batch, or inline) gives the
    ranges that numpy's histograms of all samples give, bit for bit."""
    from exporter.quantize import ranges as module

    monkeypatch.setattr(module, "HISTOGRAM_THREAD", threaded)
    x = _outlier_data(size=64 * 50).reshape(50, 64)
    data = CalibrationData({"x": x}, {"x": x[:2]}, batch=4, source="test")
    for method in ("percentile", "entropy", "mse"):
        got = collect_ranges(_relu_model(), ["n", "y"], data, method=method)
        for name, values in (("n", -x), ("y", np.maximum(-x, 0))):
            max_abs = float(np.abs(values).max())
            hist = np.histogram(np.abs(values), bins=NUM_BINS, range=(0, max_abs))[0]
            assert got[name] == amax_from_histogram(hist, max_abs, method), (method, name)


def _token_model() -> onnx.ModelProto:
    """`v` = float(input_ids) [b, s, 1]: a tensor whose values at padded positions are the padding's ids."""
    graph = helper.make_graph(
        [
            helper.make_node("Cast", ["input_ids"], ["c"], to=TensorProto.FLOAT),
            helper.make_node("Unsqueeze", ["c", "axes"], ["v"]),
        ],
        "g",
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["b", "s"]),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["b", "s"]),
        ],
        [helper.make_tensor_value_info("v", TensorProto.FLOAT, ["b", "s", 1])],
        [helper.make_tensor("axes", TensorProto.INT64, [1], [2])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_calibration_reads_real_tokens_only(tmp_path: Path) -> None:
    """Ranges and channel maxima come from real tokens: padded positions are never read by a real token's
    output (held-out judge), so their values must not widen a range. Padding here holds id 900, real tokens
    1..5, samples of lengths 3 and 5 in batches of 2 (sorted by length: no padding left inside a batch)."""
    from exporter.quantize.ranges import measure_maxima

    lengths = np.array([5, 3, 5, 3])
    mask = (np.arange(8)[None, :] < lengths[:, None]).astype(np.int64)
    ids = np.where(mask == 1, np.arange(1, 9)[None, :], 900).astype(np.int64)
    feeds = {"input_ids": ids, "attention_mask": mask}
    data = CalibrationData(feeds, {k: v[:1] for k, v in feeds.items()}, batch=2, source="test")
    for method in ("max", "mse"):
        assert collect_ranges(_token_model(), ["v"], data, method=method)["v"] <= 5.0, method
    channels, whole = measure_maxima(_token_model(), ["v"], ["v"], data, tmp_path, None, "t")
    assert channels["v"].tolist() == [5.0] and whole == {"v": 5.0}
