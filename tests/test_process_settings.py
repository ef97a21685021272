"""An export's process-wide settings (exporter/report/process.py) hold during the export and are put back
after it, also when the export fails: a library user's process must not keep our malloc or GC settings."""

from __future__ import annotations

import pytest

from exporter.api import export_engine
from exporter.report import process
from tests.test_export_api import FP32, family_masks


class FakeLibc:
    """Records mallopt calls as glibc would apply them (last value wins)."""

    def __init__(self) -> None:
        self.values: dict[int, int] = {}
        self.calls = 0

    def mallopt(self, param, value) -> int:
        self.values[param.value] = value.value
        self.calls += 1
        return 1


def test_malloc_settings_hold_inside_and_are_restored_after(monkeypatch) -> None:
    libc = FakeLibc()
    monkeypatch.setattr(process, "_glibc", lambda: libc)
    with process.malloc_for_export():
        assert libc.values == process.EXPORT_SETTINGS
        with process.malloc_for_export():  # nested: the outer export owns the settings
            pass
        assert libc.values == process.EXPORT_SETTINGS
    assert libc.values == process.GLIBC_DEFAULTS
    with pytest.raises(RuntimeError), process.malloc_for_export():
        raise RuntimeError("export failed")
    assert libc.values == process.GLIBC_DEFAULTS


def test_user_malloc_environment_is_left_alone(monkeypatch) -> None:
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "1000000")
    assert process._glibc() is None


def test_export_engine_runs_under_the_settings_and_restores_them(
    model_dir_factory, tmp_path, monkeypatch
) -> None:
    from exporter import api

    libc = FakeLibc()
    monkeypatch.setattr(process, "_glibc", lambda: libc)
    seen = {}
    real_tail = api._Run._tail

    def tail(self, *args):
        seen["malloc"] = dict(libc.values)
        real_tail(self, *args)

    monkeypatch.setattr(api._Run, "_tail", tail)
    masks, _ = family_masks("bert")
    export_engine(model_dir_factory("bert", masks=masks), tmp_path / "out", FP32)
    assert seen["malloc"] == process.EXPORT_SETTINGS
    assert libc.values == process.GLIBC_DEFAULTS


def test_streamed_export_keeps_glibc_defaults(tmp_path, monkeypatch) -> None:
    """The streamed export (the 8B path) is bounded by its own per-piece trims: no raised thresholds."""
    import torch

    from exporter.config import ExportConfig
    from exporter.testing.synthetic import write_model_dir

    libc = FakeLibc()
    monkeypatch.setattr(process, "_glibc", lambda: libc)
    src = write_model_dir(
        tmp_path / "src", "llama", config_overrides={"num_hidden_layers": 2}, dtype=torch.float32
    )
    config = ExportConfig(
        streaming="on", precision="fp32", benchmark=False, sequence_length=32, validation_samples=4
    )
    export_engine(src, tmp_path / "out", config)
    assert libc.calls == 0


def test_gc_settings_hold_inside_and_are_restored_after() -> None:
    import gc

    before = gc.get_threshold()
    assert gc.get_freeze_count() == 0
    with process.gc_for_export():
        assert gc.get_threshold() == process.GC_EXPORT_THRESHOLD
        assert gc.get_freeze_count() > 0  # what was alive before the export is out of the walks
        with process.gc_for_export():
            pass
        assert gc.get_threshold() == process.GC_EXPORT_THRESHOLD
    assert gc.get_threshold() == before
    assert gc.get_freeze_count() == 0
    with pytest.raises(RuntimeError), process.gc_for_export():
        raise RuntimeError("export failed")
    assert gc.get_threshold() == before
    assert gc.get_freeze_count() == 0


def test_a_callers_frozen_objects_stay_frozen(monkeypatch) -> None:
    """Under a caller's own gc.freeze(), the export neither freezes nor unfreezes. (Counting the frozen
    objects before and after was flaky: a frozen object that another thread lets go leaves the count.)"""
    import gc

    calls: list[str] = []
    gc.freeze()
    try:
        with monkeypatch.context() as patched:
            patched.setattr(gc, "freeze", lambda: calls.append("freeze"))
            patched.setattr(gc, "unfreeze", lambda: calls.append("unfreeze"))
            with process.gc_for_export():
                pass
        assert calls == []
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()


def test_stage_boundaries_collect_garbage_cycles_under_export_settings(
    model_dir_factory, tmp_path, monkeypatch
) -> None:
    import gc

    collected = []
    monkeypatch.setattr(gc, "collect", lambda *a: collected.append(a) or 0)
    process.collect_between_stages()
    assert collected == []  # outside an export: Python's own schedule
    masks, _ = family_masks("bert")
    export_engine(model_dir_factory("bert", masks=masks), tmp_path / "out", FP32)
    assert len(collected) >= 5  # one before each stage
