"""Check sessions shared within a stage (exporter/validate/sessions.py): the same file with the same options
gets the same session inside `shared()` only, a rewritten file or other options a new one, and the
decoder's export stage builds one session for model.exported.onnx instead of two (same check numbers): the
one built from the export's bytes, adopted for the file once written."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from graph_models import decomposed_layernorm_graph
from test_decoder_export import build_pruned_model

from exporter import api
from exporter.export.decoder_with_past import export_decoder_with_past
from exporter.validate import sessions


@pytest.fixture
def built(monkeypatch):
    """Counts the sessions ONNX Runtime builds, by (file name or "<bytes>", optimizations on)."""
    counts: dict[tuple[str, bool], int] = {}
    real = ort.InferenceSession

    def counting(path, options=None, *args, sess_options=None, **kwargs):  # type: ignore[no-untyped-def]
        options = options if options is not None else sess_options  # (the runner passes it by name)
        on = options is None or options.graph_optimization_level != ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        key = ("<bytes>" if isinstance(path, bytes) else str(path).rsplit("/", 1)[-1], on)
        counts[key] = counts.get(key, 0) + 1
        return real(path, options, *args, **kwargs)

    monkeypatch.setattr(ort, "InferenceSession", counting)
    return counts


def test_same_file_same_options_share_one_session_inside_the_block_only(tmp_path, built):
    path = tmp_path / "m.onnx"
    onnx.save(decomposed_layernorm_graph(), str(path))
    outside = [sessions.check_session(path), sessions.check_session(path)]
    assert outside[0] is not outside[1]
    with sessions.shared():
        first = sessions.check_session(path)
        assert sessions.check_session(path) is first
        optimized = sessions.check_session(path, optimized=True)
        assert optimized is not first
        assert sessions.check_session(path, optimized=True) is optimized  # the last one is kept
        assert sessions.check_session(path) is not first  # one session kept, not two
        onnx.save(decomposed_layernorm_graph(hidden=8), str(path))  # rewritten: another file
        assert sessions.check_session(path) is not first
        with sessions.shared():  # nested: the same sharing
            again = sessions.check_session(path)
        assert sessions.check_session(path) is again
    assert sessions.check_session(path) is not again  # after the block: nothing kept
    assert built[("m.onnx", False)] == 6 and built[("m.onnx", True)] == 1


def test_the_decoder_export_stage_builds_one_session_for_its_file_with_the_same_numbers(tmp_path, built):
    path = tmp_path / "model.exported.onnx"
    rng = np.random.default_rng(0)
    mask = np.ones((2, 7), np.int64)
    mask[1, :2] = 0  # left padding
    feeds = {"input_ids": rng.integers(0, 100, (2, 7)), "attention_mask": mask}
    with sessions.shared():
        export_decoder_with_past(build_pruned_model("llama", seed=1), path)  # validates on ORT
        shared = api._decoder_prefill_outputs(path, feeds)["logits"]
    # the one session: built from the export's bytes while its file was written, then adopted for the file
    assert built == {("<bytes>", False): 1}
    fresh = api._decoder_prefill_outputs(path, feeds)["logits"]  # a new session, as before the sharing
    assert built == {("<bytes>", False): 1, ("model.exported.onnx", False): 1}
    np.testing.assert_array_equal(shared, fresh)


def test_an_adopted_session_is_the_files_last_session_inside_the_block_only(tmp_path, built):
    path = tmp_path / "m.onnx"
    onnx.save(decomposed_layernorm_graph(), str(path))
    from_bytes = sessions.session_from_bytes(path.read_bytes())
    sessions.adopt(path, from_bytes)  # outside `shared()`: nothing kept
    assert sessions.check_session(path) is not from_bytes
    with sessions.shared():
        sessions.adopt(path, from_bytes)
        assert sessions.check_session(path) is from_bytes
        assert sessions.check_session(path, optimized=True) is not from_bytes  # other options: another
        sessions.adopt(path, from_bytes)
        assert sessions.check_session(path) is from_bytes
        onnx.save(decomposed_layernorm_graph(hidden=8), str(path))  # rewritten: not the adopted one
        assert sessions.check_session(path).get_inputs()[0].shape[-1] == 8
    assert built == {("<bytes>", False): 1, ("m.onnx", False): 2, ("m.onnx", True): 1}


def test_a_prefetched_session_is_the_one_check_session_returns_once_inside_the_block_only(tmp_path, built):
    path = tmp_path / "m.onnx"
    onnx.save(decomposed_layernorm_graph(), str(path))
    sessions.prefetch(path)  # outside `background()`: nothing built
    assert built == {}
    with sessions.background():
        sessions.prefetch(path)
        sessions.prefetch(path, optimized=True)
        order = [sessions.submit(lambda: len(built)).result()]  # runs after both builds, on the same thread
        first = sessions.check_session(path)
        assert built == {("m.onnx", False): 1, ("m.onnx", True): 1} and order == [2]
        assert sessions.check_session(path) is not first  # taken once
        sessions.prefetch(path)
        onnx.save(decomposed_layernorm_graph(hidden=8), str(path))  # rewritten after the prefetch: not taken
        rewritten = sessions.check_session(path)
        assert rewritten.get_inputs()[0].shape[-1] == 8
        sessions.prefetch(path)  # never taken: released at the block's end
    assert sessions._prefetched == {} and sessions._pool is None
    fresh = sessions.check_session(path)
    out = fresh.run(None, {"x": np.zeros((2, 3, 8), np.float32)})
    assert out[0].shape == (2, 3, 8)
    assert sessions.submit(lambda: 7).result() == 7  # outside the block: at once


def test_background_work_that_raises_raises_where_it_is_taken(tmp_path):
    with sessions.background():
        broken = tmp_path / "broken.onnx"
        broken.write_bytes(b"not onnx")
        sessions.prefetch(broken)
        with pytest.raises(Exception, match=r"(?i)protobuf|parse|load|invalid"):
            sessions.check_session(broken)


def _spins(session) -> bool:  # type: ignore[no-untyped-def]
    try:
        return (
            session.get_session_options().get_session_config_entry("session.intra_op.allow_spinning") != "0"
        )
    except Exception:  # not set: ONNX Runtime's default, spinning
        return True


@pytest.mark.parametrize("optimized", [False, True])
def test_prefetched_sessions_differ_from_those_built_on_demand_only_in_idle_spinning(tmp_path, optimized):
    """Same graph optimizations and threads, same outputs; only a prefetched session's idle threads sleep (a
    session built on demand or from a file's bytes, as model.onnx's check is, keeps ONNX Runtime's default)."""
    path = tmp_path / "m.onnx"
    onnx.save(decomposed_layernorm_graph(), str(path))
    x = {"x": np.random.default_rng(0).normal(size=(2, 3, 16)).astype(np.float32)}
    with sessions.background():
        sessions.prefetch(path, optimized)
        prefetched = sessions.check_session(path, optimized)
        on_demand = sessions.check_session(path, optimized)
    from_bytes = sessions.session_from_bytes(path.read_bytes(), optimized)
    built = (prefetched, on_demand, from_bytes)
    level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimized else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    assert [s.get_session_options().graph_optimization_level for s in built] == [level] * 3
    assert len({s.get_session_options().intra_op_num_threads for s in built}) == 1
    assert [_spins(s) for s in built] == [False, True, True]
    outputs = [s.run(None, x)[0] for s in built]
    np.testing.assert_array_equal(outputs[0], outputs[1])
    np.testing.assert_array_equal(outputs[0], outputs[2])


def test_a_check_as_deployed_runs_the_cpu_runners_session_and_shares_it(tmp_path, built):
    """Inside `as_deployed(threads)`, an optimized check runs the session an `OnnxRuntimeRunner` of the file with
    those threads (idle threads sleeping) runs: inside `shared_sessions()` the very session the CPU engine's
    runner of that file then takes (one build, not two). Unoptimized checks and other threads are unaffected."""
    from engines.onnxruntime_runner import DISABLED_OPTIMIZERS, OnnxRuntimeRunner, shared_sessions

    path = tmp_path / "m.onnx"
    onnx.save(decomposed_layernorm_graph(), str(path))
    x = {"x": np.random.default_rng(0).normal(size=(2, 3, 16)).astype(np.float32)}
    with shared_sessions(), sessions.background(), sessions.as_deployed(1):
        sessions.prefetch(path, optimized=True)
        checked = sessions.check_session(path, optimized=True)
        plain = sessions.check_session(path)
        with OnnxRuntimeRunner(path, threads=1, spinning=False) as runner:
            assert runner._session is checked
            np.testing.assert_array_equal(runner.infer(x)["y"], checked.run(None, x)[0])
        with OnnxRuntimeRunner(path, threads=2, spinning=False) as other:
            assert other._session is not checked
    assert built[("m.onnx", True)] == 2 and built[("m.onnx", False)] == 1
    options = checked.get_session_options()
    assert options.intra_op_num_threads == 1 and not _spins(checked)
    assert plain.get_session_options().graph_optimization_level == ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    assert DISABLED_OPTIMIZERS  # the runner's own optimizer settings, which the check now shares
    with sessions.as_deployed(1):  # outside `shared_sessions()`: the runner's options, a session each
        assert sessions.check_session(path, optimized=True) is not sessions.check_session(
            path, optimized=True
        )
    assert sessions.check_session(path, optimized=True).get_session_options().intra_op_num_threads == 0


def test_a_timed_decoder_export_builds_one_deployed_session_per_file(model_dir_factory, tmp_path, built):
    """A KV-cache decoder's INT8 export checks model.int8.cpu.onnx and model.onnx as deployed (prefill, greedy
    agreement) and then opens and times both as CPU engine candidates: one optimized session each, shared."""
    import dataclasses

    from exporter.config import ExportConfig

    config = ExportConfig(precision="int8", calibration="random", sequence_length=32, validation_samples=4)
    config = dataclasses.replace(config, backend="onnxruntime")  # the ONNX Runtime candidates only
    result = api.export_engine(model_dir_factory("llama"), tmp_path / "out", config)
    cpu = result.report["engine"]["cpu"]
    timed = {row["name"] for row in cpu["candidates"] if row["latency_ms"] is not None}
    assert timed == {"onnxruntime-int8", "onnxruntime-fp32"}, cpu["candidates"]
    assert "greedy_agreement" in result.report["int8"]["cpu"]
    # in quantize: the held-out judge's and the optimized-graph op count's; then one deployed session (was two)
    assert built[("model.int8.cpu.onnx", True)] == 3
    assert built[("model.onnx", True)] == 1
