"""The output folder is all-or-nothing: a failed export leaves OUT_DIR as it was (absent, or the previous
export, even with --force) and no staging folder beside it; an OUT_DIR that cannot be written is a
one-line InputError (exit code 2) before any work."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from export_errors import InputError
from exporter import api, outputs
from exporter.api import export_engine
from exporter.cli import main as cli_main
from exporter.config import ExportConfig
from exporter.testing.synthetic import layer_param, row_mask

FP32 = {"precision": "fp32", "benchmark": False, "sequence_length": 32, "validation_samples": 4}


@pytest.fixture
def model_dir(model_dir_factory) -> Path:
    return model_dir_factory("bert", masks={layer_param("bert", 0, "up"): row_mask((128, 64), range(9))})


@pytest.fixture
def parent(tmp_path) -> Path:
    """An empty folder that holds only OUT_DIR: anything else left in it is debris."""
    folder = tmp_path / "parent"
    folder.mkdir()
    return folder


def snapshot(folder: Path) -> dict[str, bytes | None]:
    """Every path under `folder` with its bytes (None for folders)."""
    return {
        str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None)
        for p in sorted(folder.rglob("*"))
    }


def fail_during_export(monkeypatch, error: BaseException) -> None:
    """Make the ONNX export write half a file and then fail, late in the run (plan and compact model
    are already in the staging folder)."""

    def half_written(wrapper, args, path, *rest, **kwargs):  # type: ignore[no-untyped-def]
        Path(path).write_bytes(b"\x08\x07half an onnx")
        raise error

    monkeypatch.setattr(api, "start_export", half_written)


@pytest.mark.parametrize("error", [RuntimeError("boom"), KeyboardInterrupt()], ids=["error", "interrupt"])
def test_failed_export_leaves_no_output_and_no_staging(error, model_dir, parent, monkeypatch) -> None:
    fail_during_export(monkeypatch, error)
    with pytest.raises(type(error)):
        export_engine(model_dir, parent / "out", ExportConfig(**FP32))
    assert list(parent.iterdir()) == []


def test_failed_force_run_keeps_the_previous_output(model_dir, parent, monkeypatch) -> None:
    out = parent / "out"
    export_engine(model_dir, out, ExportConfig(**FP32))
    before = snapshot(parent)
    assert "out/model.onnx" in before
    fail_during_export(monkeypatch, RuntimeError("boom"))
    with pytest.raises(RuntimeError):
        export_engine(model_dir, out, ExportConfig(**FP32, force=True))
    assert snapshot(parent) == before


def test_force_replaces_the_whole_folder(model_dir, parent) -> None:
    out = parent / "out"
    out.mkdir()
    (out / "stale.txt").write_text("from an older run")
    export_engine(model_dir, out, ExportConfig(**FP32, force=True))
    assert not (out / "stale.txt").exists()
    assert (out / "model.onnx").is_file() and (out / "report.json").is_file()
    assert [p.name for p in parent.iterdir()] == ["out"]


def test_non_empty_output_without_force_is_refused_before_any_work(model_dir, parent, monkeypatch) -> None:
    out = parent / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    monkeypatch.setattr(api, "load_model_dir", lambda *a, **k: pytest.fail("work started"))
    with pytest.raises(InputError, match="--force") as caught:
        export_engine(model_dir, out, ExportConfig(**FP32))
    assert caught.value.exit_code == 2 and caught.value.where == str(out)
    assert snapshot(parent) == {"out": None, "out/keep.txt": b"mine"}


def test_an_empty_existing_output_folder_is_used_without_force(model_dir, parent) -> None:
    (parent / "out").mkdir()
    export_engine(model_dir, parent / "out", ExportConfig(**FP32))
    assert (parent / "out" / "model.onnx").is_file()


def test_output_path_that_is_a_file_is_refused(model_dir, parent) -> None:
    (parent / "out").write_text("a file")
    with pytest.raises(InputError, match="not a folder"):
        export_engine(model_dir, parent / "out", ExportConfig(**FP32, force=True))
    assert (parent / "out").read_text() == "a file"


def test_output_under_a_file_is_a_one_line_input_error(model_dir, parent, capsys) -> None:
    """OUT=/some/file/out cannot be created, even by root."""
    (parent / "file").write_text("x")
    out = parent / "file" / "out"
    with pytest.raises(InputError) as caught:
        export_engine(model_dir, out, ExportConfig(**FP32))
    assert str(parent / "file") in str(caught.value) and "\n" not in str(caught.value)

    code = cli_main([str(model_dir), "-o", str(out), "--precision", "fp32", "--no-benchmark", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("export-engine: error: ") and str(out) in err
    assert snapshot(parent) == {"file": b"x"}


def _can_write(folder: Path) -> bool:
    try:
        (folder / ".probe").mkdir()
    except OSError:
        return False
    (folder / ".probe").rmdir()
    return True


def test_read_only_parent_folder_is_a_one_line_input_error(model_dir, parent, capsys) -> None:
    parent.chmod(0o555)
    try:
        if _can_write(parent):
            pytest.skip(
                "chmod 0555 does not stop this user from writing (running as root / CAP_DAC_OVERRIDE)"
            )
        out = parent / "out"
        code = cli_main([str(model_dir), "-o", str(out), "--precision", "fp32", "--no-benchmark", "--quiet"])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and "not writable" in err
        assert list(parent.iterdir()) == []
    finally:
        parent.chmod(0o755)


def test_parent_on_a_read_only_filesystem_is_an_input_error(model_dir, parent, monkeypatch) -> None:
    def read_only(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(parent))

    monkeypatch.setattr(outputs.tempfile, "mkdtemp", read_only)
    with pytest.raises(InputError, match="out"):
        export_engine(model_dir, parent / "out", ExportConfig(**FP32))


def test_previous_output_survives_a_failed_final_rename(model_dir, parent, monkeypatch) -> None:
    out = parent / "out"
    export_engine(model_dir, out, ExportConfig(**FP32))
    before = snapshot(out)
    real_rename = Path.rename

    def rename(self: Path, target):  # type: ignore[no-untyped-def]
        if ".partial-" in self.name:
            raise OSError(errno.EIO, "simulated I/O error")
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", rename)
    with pytest.raises(OSError):
        export_engine(model_dir, out, ExportConfig(**FP32, force=True))
    monkeypatch.undo()
    assert snapshot(out) == before
    assert [p.name for p in parent.iterdir()] == ["out"]
