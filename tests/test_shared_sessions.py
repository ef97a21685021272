"""Sessions and graphs the INT8 stage reuses instead of building or reading again: the same numbers as
building anew, fewer builds (the held-out judgement of the search's last candidate; the decoder's past
shapes from the graph in memory)."""

from __future__ import annotations

import numpy as np
import onnx
from quant_test_models import DIM, mlp_with_outlier

from exporter.quantize import early_stop, int8
from exporter.quantize.calibration import CalibrationData


def _data() -> CalibrationData:
    x = np.random.default_rng(0).normal(0, 1, (96, 4, DIM)).astype(np.float32)
    return CalibrationData({"x": x[:64]}, {"x": x[64:]}, batch=16, source="seeded normal")


def test_judge_reuses_the_session_of_the_same_graph_and_options(tmp_path) -> None:
    model = mlp_with_outlier()
    path = tmp_path / "fp32.onnx"
    onnx.save(model, path)
    judge = int8.Judge(path, _data(), 32, None)
    fresh = int8.Judge(path, _data(), 32, None)
    search = judge.search_cosine(model, fake_quant=True)
    heldout = judge.heldout_cosine(model, fake_quant=True)
    assert judge.sessions_built == 1  # the held-out judgement ran on the search's session
    assert heldout == fresh.heldout_cosine(model, fake_quant=True)  # same number as a session built anew
    assert search == fresh.search_cosine(mlp_with_outlier(), fake_quant=True)
    judge.heldout_cosine(model)  # other options: a new session
    assert judge.sessions_built == 2
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    judge.heldout_cosine(copy)  # an equal graph but another object: not assumed unchanged
    assert judge.sessions_built == 3
    judge.heldout_cosine(path)
    judge.search_cosine(path)
    assert judge.sessions_built == 4  # the same unchanged file
    onnx.save(mlp_with_outlier(), path)  # rewritten: its modification time moved
    judge.search_cosine(path)
    assert judge.sessions_built == 5


def test_past_shapes_from_the_graph_in_memory_equal_the_file(tmp_path) -> None:
    from test_decoder_export import build_pruned_model

    from exporter.export.decoder_with_past import export_decoder_with_past
    from exporter.quantize.decoder_calibration import past_shapes

    path = tmp_path / "decoder_model.onnx"
    export_decoder_with_past(build_pruned_model("qwen2", seed=3), path)
    graph = onnx.load(str(path)).graph
    assert past_shapes(path, graph) == past_shapes(path)
    assert past_shapes(tmp_path / "not_read.onnx", graph) == past_shapes(path)  # the file is not read


def test_references_made_on_another_thread_are_the_ones_made_on_first_use(tmp_path) -> None:
    """`Judge.prepare_in`: the fp32 references made beside the caller's work (the Q/DQ search's Python) give
    the same cosines as references made on first use, are made once, and are waited for, not raced."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    model = mlp_with_outlier()
    path = tmp_path / "fp32.onnx"
    onnx.save(model, path)
    fresh = int8.Judge(path, _data(), 32, None)
    expected = (fresh.search_cosine(model, fake_quant=True), fresh.heldout_cosine(model, fake_quant=True))
    gate, calls, threads = threading.Event(), [], []
    judge = int8.Judge(path, _data(), 32, None)
    reference = judge.reference

    def slow_reference(feeds):  # held until the caller has asked: the first use must wait for it
        gate.wait(5)
        calls.append(1)
        threads.append((threading.get_ident(), len(feeds["x"])))
        return reference(feeds)

    judge.reference = slow_reference
    with ThreadPoolExecutor(1) as pool:
        judge.prepare_in(pool, "calibration")
        judge.prepare_in(pool, "heldout")
        judge.prepare_in(pool, "heldout")  # asked twice: made once
        threading.Timer(0.2, gate.set).start()
        got = (judge.search_cosine(model, fake_quant=True), judge.heldout_cosine(model, fake_quant=True))
    assert got == expected
    made = len(calls)
    # on the pool's one thread: the search samples' and the held-out split's first chunk (a judge that stops
    # early reads no more); the held-out rest on first use, here
    here = threading.get_ident()
    pool_made = [samples for thread, samples in threads if thread != here]
    assert len({thread for thread, _ in threads if thread != here}) == 1
    assert sum(pool_made) == 32 + early_stop.MIN_SAMPLES
    assert sum(samples for thread, samples in threads if thread == here) == 32 - early_stop.MIN_SAMPLES
    judge.search_cosine(model, fake_quant=True)
    judge.heldout_cosine(model, fake_quant=True)
    assert len(calls) == made  # not made again


def test_the_exports_fp32_check_of_the_fused_source_stands(tmp_path, monkeypatch) -> None:
    """The CPU file's fused source (the export's model.onnx) is taken on the export's own fp32-gated check of it
    (`cpu_fused_checked`): no session is built to check it again. Without that check it is checked here, and a
    fused graph outside 10x the fp32 bound falls back to the plain graph."""
    model = mlp_with_outlier()
    fp32, fused = tmp_path / "fp32.onnx", tmp_path / "fused.onnx"
    onnx.save(model, fp32)
    onnx.save(model, fused)
    built, session = [], int8._session
    monkeypatch.setattr(int8, "_session", lambda m, *a, **k: built.append(str(m)) or session(m, *a, **k))
    config = int8.QuantConfig(cpu_graph_passes_family="test", cpu_fused_source=fused, cpu_fused_checked=3e-6)
    judge = int8.Judge(fp32, _data(), 32, None)
    source, report = int8._fused_or_plain(fp32, tmp_path, judge, config)
    assert source == fused and report["applied"] and report["max_abs_vs_fp32"] == 3e-6
    assert "optimized_fp32" in report["checked_by"] and not [b for b in built if b.endswith("fused.onnx")]
    config.cpu_fused_checked = None
    source, report = int8._fused_or_plain(fp32, tmp_path, judge, config)
    assert source == fused and report["max_abs_vs_fp32"] == 0.0 and "checked_by" not in report
    assert [b for b in built if b.endswith("fused.onnx")]  # checked here
    broken = onnx.ModelProto()
    broken.CopyFrom(model)
    for init in broken.graph.initializer:
        if init.data_type == onnx.TensorProto.FLOAT and len(init.dims) == 2:
            weight = onnx.numpy_helper.to_array(init) + 0.5
            init.CopyFrom(onnx.numpy_helper.from_array(weight.astype(np.float32), init.name))
    onnx.save(broken, fused)
    source, report = int8._fused_or_plain(fp32, tmp_path, judge, config)
    assert source == fp32 and not report["applied"] and "max abs error" in report["reason"]
