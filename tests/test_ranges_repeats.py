"""Repeated calibration tensors (exporter/quantize/repeats.py): a GQA decoder's K^T and V measured on their
source, counts weighted by the copies, give bit for bit the ranges of the tensors themselves; a chain that is
not a pure repetition (a Mul or a Slice after the Expand, a Tile) is measured directly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from exporter.quantize import ranges as ranges_module
from exporter.quantize import repeats as repeats_module
from exporter.quantize.calibration import CalibrationData
from exporter.quantize.ranges import METHODS, NUM_BINS, abs_histogram, amax_from_histogram, collect_ranges
from exporter.quantize.repeats import Fetch, Repeat, Repeated, find_repeats

REPEATED = {
    "v": Repeat("u", "kv_shape"),  # repeat_kv: Unsqueeze -> Expand -> Reshape
    "kt": Repeat("u", "kv_shape"),  # ... then the Transpose to K^T
    "e": Repeat("u", "kv_shape"),  # the Expand's own output
    "w": Repeat("u", "by_length"),  # repeated as many times as there are tokens: copies differ per batch
    "c": Repeat("u", "constant_shape"),  # an initializer's shape
}
DIRECT = ["kv", "doubled", "first", "tiled"]  # a Mul, a Slice or a Tile after the Expand: measured directly
NAMES = [*REPEATED, *DIRECT]


def _ints(name: str, values: list[int]) -> onnx.TensorProto:
    return helper.make_tensor(name, TensorProto.INT64, [len(values)], values)


def _repeat_kv_model() -> onnx.ModelProto:
    """x [b, s, 8] -> kv [b, 2 heads, s, 4] -> u [b, 2, 1, s, 4] (Unsqueeze), expanded 3x (query heads per KV
    head: e, v [b, 6, s, 4], kt [b, 6, 4, s]), s times (w), or 3x by a constant shape (c); and the chains that
    are no repetition of u by an Expand alone: doubled (a Mul after it), first (a Slice of the first token),
    tiled (v tiled twice more: a repetition, of another count)."""
    node = helper.make_node
    nodes = [
        node("Reshape", ["x", "heads"], ["kv_bshd"]),
        node("Transpose", ["kv_bshd"], ["kv"], perm=[0, 2, 1, 3]),
        node("Unsqueeze", ["kv", "axis2"], ["u"]),
        node("Shape", ["kv"], ["kv_dims"]),
        node("Slice", ["kv_dims", "zero", "two"], ["batch_heads"]),
        node("Slice", ["kv_dims", "two", "four"], ["length_dim"]),
        node("Slice", ["kv_dims", "two", "three"], ["length"]),
        node("Concat", ["batch_heads", "groups", "length_dim"], ["kv_shape"], axis=0),
        node("Expand", ["u", "kv_shape"], ["e"]),
        node("Reshape", ["e", "query_heads"], ["v"]),
        node("Transpose", ["v"], ["kt"], perm=[0, 1, 3, 2]),
        node("Concat", ["batch_heads", "length", "length_dim"], ["by_length"], axis=0),
        node("Expand", ["u", "by_length"], ["e_length"]),
        node("Flatten", ["e_length"], ["w"], axis=1),
        node("Expand", ["u", "constant_shape"], ["e_constant"]),
        node("Identity", ["e_constant"], ["e_identity"]),
        node("Reshape", ["e_identity", "query_heads"], ["c"]),
        node("Mul", ["e", "two_f"], ["e_doubled"]),
        node("Reshape", ["e_doubled", "query_heads"], ["doubled"]),
        node("Slice", ["e", "zero", "one", "axis3"], ["e_first"]),
        node("Reshape", ["e_first", "query_heads"], ["first"]),
        node("Tile", ["v", "tile"], ["tiled"]),
    ]
    initializers = [
        _ints("heads", [0, 0, 2, 4]),
        _ints("axis2", [2]),
        _ints("axis3", [3]),
        _ints("zero", [0]),
        _ints("one", [1]),
        _ints("two", [2]),
        _ints("three", [3]),
        _ints("four", [4]),
        _ints("groups", [3]),
        _ints("query_heads", [0, 6, -1, 4]),
        _ints("constant_shape", [1, 1, 3, 1, 1]),
        _ints("tile", [1, 2, 1, 1]),
        helper.make_tensor("two_f", TensorProto.FLOAT, [], [2.0]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", 8])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in NAMES],
        initializers,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _data() -> CalibrationData:
    """Prefills of 5 tokens, then 'decode steps' of 9 (another number of copies for `w`); the largest |x| on
    the last token (the one `first` leaves out)."""
    rng = np.random.default_rng(0)
    main = rng.normal(size=(20, 5, 8)).astype(np.float32)
    main[rng.choice(20, 3, replace=False), rng.integers(0, 5, 3), rng.integers(0, 8, 3)] = [9.0, -12.0, 7.0]
    main[4, -1, 6] = -30.0
    step = (rng.normal(size=(20, 9, 8)) * 1.5).astype(np.float32)
    return CalibrationData(
        {"x": main}, {"x": main[:2]}, batch=8, source="test", groups={"calibration": [{"x": step}]}
    )


def _direct_batches(model: onnx.ModelProto, data: CalibrationData, tmp: Path) -> list[dict[str, np.ndarray]]:
    """Every batch's arrays of every tensor in `NAMES` and of u, as ONNX Runtime computes them."""
    fetch = Fetch([*NAMES, "u"])
    session = ranges_module._session_with_outputs(model, fetch.outputs, tmp)
    return list(ranges_module._passes(session, fetch, data, None, "direct"))


def _numpy_ranges(batches: list[dict[str, np.ndarray]], method: str) -> dict[str, float]:
    ranges = {}
    for name in NAMES:
        values = np.abs(np.concatenate([b[name].reshape(-1) for b in batches]))
        hist = np.histogram(values, bins=NUM_BINS, range=(0.0, float(values.max())))[0]
        ranges[name] = amax_from_histogram(hist, float(values.max()), method)
    return ranges


def test_repeats_are_an_expand_then_only_value_moving_ops() -> None:
    assert find_repeats(_repeat_kv_model(), NAMES) == REPEATED
    assert find_repeats(_repeat_kv_model(), ["u", "x", "missing"]) == {}


def test_a_source_shared_by_several_tensors_is_fetched_once() -> None:
    fetch = Fetch.plan(_repeat_kv_model(), ["v", "kt", "kv", "u", "w"])
    assert fetch.outputs == ["u", "kv_shape", "kv", "by_length"]
    direct = Fetch.plan(_repeat_kv_model(), ["v", "kt"], direct=["kt"])  # per-channel maxima need the array
    assert direct.outputs == ["u", "kv_shape", "kt"] and set(direct.repeats) == {"v"}


def test_each_batch_counts_and_maxima_equal_the_repeated_tensors_own(tmp_path: Path) -> None:
    """Batch by batch (prefills and decode steps, whose `w` holds another number of copies): the copies are
    numel(tensor) / numel(source), the histogram of the source times the copies is the tensor's, bit for bit,
    and so is max |x|."""
    model, data = _repeat_kv_model(), _data()
    direct = _direct_batches(model, data, tmp_path)
    fetch = Fetch.plan(model, NAMES)
    session = ranges_module._session_with_outputs(model, fetch.outputs, tmp_path)
    deduped = list(ranges_module._passes(session, fetch, data, None, "deduped"))
    assert len(deduped) == len(direct) == 6
    assert {deduped[0]["w"].copies, deduped[-1]["w"].copies} == {5, 9}
    for got, want in zip(deduped, direct, strict=True):
        for name in NAMES:
            high = float(np.abs(want[name]).max())
            assert isinstance(got[name], Repeated) == (name in REPEATED), name
            if name in REPEATED:
                assert got[name].values.shape == want["u"].shape
                assert got[name].copies == want[name].size // want["u"].size, name
            assert ranges_module._absmax(got[name]) == high, name
            counts = ranges_module._histogram(got[name], high)
            assert np.array_equal(counts, abs_histogram(want[name], high)), name


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("budget", [None, 0])
def test_ranges_of_repeated_tensors_are_those_measured_directly(
    method: str, budget: int | None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Every method: the deduplicated ranges equal those of the repeated tensors fetched whole, and numpy's
    (np.histogram of all their values); the calibration sessions return the source, not the tensors (also
    the histogram pass where the max pass's values were not kept: budget 0)."""
    model, data = _repeat_kv_model(), _data()
    expected = _numpy_ranges(_direct_batches(model, data, tmp_path), method)
    if budget is not None:
        monkeypatch.setattr(ranges_module, "KEEP_MAX_BYTES", budget)
    sessions: list[list[str]] = []
    build = ranges_module._session_with_outputs
    monkeypatch.setattr(ranges_module, "_session_with_outputs", lambda *a: sessions.append(a[1]) or build(*a))
    deduped = collect_ranges(model, NAMES, data, method)
    assert deduped == expected
    assert sessions and all("u" in s and not set(REPEATED) & set(s) for s in sessions)
    monkeypatch.setattr(repeats_module, "find_repeats", lambda model, names: {})
    assert collect_ranges(model, NAMES, data, method) == deduped
    assert all(set(REPEATED) <= set(s) for s in sessions[-1:])


@pytest.mark.parametrize("method", ["percentile", "mse"])
@pytest.mark.parametrize("budget", [None, 0])
def test_the_maxima_pass_keeps_the_source_once_and_gives_the_same_ranges(
    method: str, budget: int | None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """SmoothQuant's pass measures max |x| and keeps the values through the source (a tensor it reads per
    channel itself), counted once in the memory budget; the ranges from them are the direct ones."""
    model, data = _repeat_kv_model(), _data()
    batches = _direct_batches(model, data, tmp_path)
    expected = _numpy_ranges(batches, method)
    if budget is not None:
        monkeypatch.setattr(ranges_module, "KEEP_MAX_BYTES", budget)
    sessions: list[list[str]] = []
    build = ranges_module._session_with_outputs
    monkeypatch.setattr(ranges_module, "_session_with_outputs", lambda *a: sessions.append(a[1]) or build(*a))
    cache, path = ranges_module.Maxima(), tmp_path / "m.onnx"
    channels = ranges_module.cached_channel_max(
        cache, path, model, ["v"], data, tmp_path, None, "t", whole=NAMES
    )
    assert np.array_equal(
        channels["v"], np.max([np.abs(b["v"]).max(axis=(0, 1, 2)) for b in batches], axis=0)
    )
    amax = cache.absmax(path, NAMES)
    assert amax == {n: max(float(np.abs(b[n]).max()) for b in batches) for n in NAMES}
    values = cache.take_values(path)
    if budget is None:
        assert isinstance(values["kt"][0], Repeated) and isinstance(values["v"][0], np.ndarray)
    session = cache.take_session(path)
    assert collect_ranges(model, NAMES, data, method, amax=amax, session=session, values=values) == expected
    assert (
        len(sessions) == 1
    )  # the histogram pass (budget 0) runs the maxima pass's session: the same outputs
    assert "u" in sessions[0] and "v" in sessions[0] and not {"kt", "e", "w", "c"} & set(sessions[0])


def test_kept_values_count_an_array_several_tensors_repeat_once() -> None:
    source = np.zeros((2, 3), np.float32)
    keep = ranges_module.KeptValues(["kt", "v", "u"], batches=1, budget=10**6)
    keep.add({"kt": Repeated(source, 4), "v": Repeated(source, 4), "u": source})
    assert keep.bytes == source.nbytes


def test_an_expand_to_nothing_has_no_values() -> None:
    """An axis of size 1 expanded to 0: an empty tensor, whose source's values count 0 times."""
    values = np.full((2, 1), 5.0, np.float32)
    empty = Repeated.of(values, np.array([2, 0]))
    assert empty.copies == 0 and ranges_module._absmax(empty) == 0.0
    assert not ranges_module._histogram(empty, 1.0).any()
    assert Repeated.of(values, np.array([3, 1, 4])).copies == 12  # a new leading axis, and a kept one
