"""Backend selection, load_runner by suffix, the ONNX Runtime runner's options, and lazy imports."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import types
import weakref

import onnx
import pytest

import engines
import engines.selection as selection
from engines import load_runner, select_backend
from engines.onnxruntime_runner import OnnxRuntimeRunner
from export_errors import BackendUnavailableError, InputError
from tests.test_engines_contract import _feeds, _model, _reference


def test_auto_falls_back_to_onnxruntime_and_says_why(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(
        selection, "tensorrt_skip_reason", lambda: "no CUDA GPU: torch.cuda.is_available() is False"
    )
    choice = select_backend("auto")
    assert choice.name == "onnxruntime" and "TensorRT cannot run" in choice.reason
    assert choice.to_json()["skipped"] == {"tensorrt": "no CUDA GPU: torch.cuda.is_available() is False"}


def test_auto_picks_tensorrt_when_it_can_run(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(selection, "tensorrt_skip_reason", lambda: None)
    choice = select_backend("auto")
    assert choice.name == "tensorrt" and "onnxruntime" in choice.skipped
    assert select_backend("tensorrt").name == "tensorrt"


def test_tensorrt_requested_where_it_cannot_run_is_one_line(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(selection, "tensorrt_skip_reason", lambda: "the tensorrt module does not import")
    with pytest.raises(BackendUnavailableError) as info:
        select_backend("tensorrt")
    assert str(info.value) == "--backend tensorrt: the tensorrt module does not import"
    assert info.value.exit_code == 2


def test_this_machine_has_no_tensorrt() -> None:
    """Here (CPU, stubs only) the real check must say no, in one line, with the install hint."""
    reason = selection.tensorrt_skip_reason()
    if reason is None:
        pytest.skip("TensorRT and a GPU are present on this machine")
    assert "\n" not in reason
    choice = select_backend("auto")
    assert choice.name == "onnxruntime" and choice.skipped["tensorrt"] == reason
    with pytest.raises(BackendUnavailableError, match="--backend tensorrt"):
        select_backend("tensorrt")


def test_onnxruntime_requested_and_unknown_backend() -> None:
    assert select_backend("onnxruntime").name == "onnxruntime"
    with pytest.raises(BackendUnavailableError, match="unknown backend 'tvm'"):
        select_backend("tvm")


def test_stub_only_tensorrt_is_not_tensorrt(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(selection.importlib, "import_module", lambda name: types.ModuleType(name))
    assert "type stubs only" in str(selection.tensorrt_unavailable_reason())

    def missing(name: str) -> types.ModuleType:
        raise ImportError(f"No module named '{name}'")

    monkeypatch.setattr(selection.importlib, "import_module", missing)
    assert "does not import (ImportError" in str(selection.tensorrt_unavailable_reason())


def test_load_runner_by_suffix(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "model.onnx"
    onnx.save(_model(), path)
    runner = load_runner(path, threads=1)
    assert isinstance(runner, OnnxRuntimeRunner) and runner.threads == 1
    with runner:
        assert runner.infer(_feeds())["y"].shape == (2, 5, 3)
    with pytest.raises(
        InputError, match=r"a \.onnx file runs on onnxruntime or openvino, not on --backend tensorrt"
    ):
        load_runner(path, backend="tensorrt")
    with pytest.raises(InputError, match=r"unknown artifact type '\.bin'"):
        load_runner(tmp_path / "model.bin")
    monkeypatch.setattr(engines, "tensorrt_skip_reason", lambda: "no CUDA GPU")
    with pytest.raises(BackendUnavailableError, match="a TensorRT engine cannot run here: no CUDA GPU"):
        load_runner(tmp_path / "model.plan")


def test_onnxruntime_runner_options(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "model.onnx"
    onnx.save(_model(), path)
    with pytest.raises(InputError, match="optimization_level"):
        OnnxRuntimeRunner(path, optimization_level="max")
    with pytest.raises(InputError, match="threads"):
        OnnxRuntimeRunner(path, threads=-1)
    with pytest.raises(BackendUnavailableError, match="no \\['NoSuchExecutionProvider'\\]"):
        OnnxRuntimeRunner(path, providers=["NoSuchExecutionProvider"]).__enter__()
    for level in ("disable", "basic", "extended", "all"):
        with OnnxRuntimeRunner(path, threads=1, optimization_level=level) as runner:
            assert runner.active_providers == ["CPUExecutionProvider"]
            feeds = _feeds()
            assert abs(runner.infer(feeds)["y"] - _reference(feeds)).max() < 1e-5


def test_runners_of_one_file_and_options_share_a_session_inside_the_block_only(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """`shared_sessions()`: the same file (unchanged) with the same options opens one session; other options, a
    rewritten file or no block: a session each. A runner's session is the same one `deployed_session` gives."""
    from engines.onnxruntime_runner import deployed_session, shared_sessions

    path = tmp_path / "model.onnx"
    onnx.save(_model(), path)
    feeds = _feeds()
    with OnnxRuntimeRunner(path, threads=1) as a, OnnxRuntimeRunner(path, threads=1) as b:
        assert a._session is not b._session
    with shared_sessions():
        with OnnxRuntimeRunner(path, threads=1, spinning=False) as a:
            session = a._session
            with OnnxRuntimeRunner(path, threads=1, spinning=False) as b:
                assert b._session is session
                assert (b.infer(feeds)["y"] == a.infer(feeds)["y"]).all()
        assert deployed_session(path, threads=1, spinning=False) is session  # while something holds it
        for other in (
            {"threads": 2, "spinning": False},
            {"threads": 1},
            {"threads": 1, "optimization_level": "basic"},
        ):
            with OnnxRuntimeRunner(path, **other) as c:
                assert c._session is not session, other
        onnx.save(_model(), path)  # rewritten (its modification time moved, as a later write's does)
        stat = path.stat()
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
        with OnnxRuntimeRunner(path, threads=1, spinning=False) as d:
            assert d._session is not session
    with OnnxRuntimeRunner(path, threads=1, spinning=False) as e:
        assert e._session is not session
    with shared_sessions():  # the block holds no session: one nobody uses any more is freed, then built anew
        with OnnxRuntimeRunner(path, threads=1, spinning=False) as f:
            alive = weakref.ref(f._session)
        gc.collect()
        assert alive() is None
        with OnnxRuntimeRunner(path, threads=1, spinning=False) as g:
            assert g._session is not None


def test_not_an_onnx_file_is_an_input_error(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "model.onnx"
    path.write_bytes(b"not a protobuf")
    with pytest.raises(InputError, match="ONNX Runtime cannot load it") as info:
        OnnxRuntimeRunner(path).__enter__()
    assert info.value.where == str(path)


def test_packages_import_without_tensorrt_or_onnxruntime() -> None:
    code = (
        "import sys, engines, exporter, engines.tensorrt.builder, engines.tensorrt.runner\n"
        "import engines.openvino_runner, engines.cpu_selection, engines.bench_cli\n"
        "bad = [m for m in ('tensorrt', 'onnxruntime', 'openvino') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
