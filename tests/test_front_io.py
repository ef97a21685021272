"""The export's front writes and checks files beside its next work (exporter/export/external_data.py
`BackgroundSave`, exporter/validate/sessions.py `session_from_bytes`): the same bytes as
onnx.save_model, the same session outputs as a session built from the file, errors re-raised in the caller,
no temporary folder left; and the faster copies of reports and agreement give what the plain code gave."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from exporter.export import external_data
from exporter.export.torch_to_onnx import CausalLMForExport, export_to_onnx
from exporter.tasks import metrics
from exporter.testing.synthetic import build_base_model
from exporter.validate import sessions
from graph_passes.base import PassReport


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 128, (2, 11), generator=gen)
    wrapper = CausalLMForExport(build_base_model("llama")).eval()
    path = tmp_path_factory.mktemp("exported") / "model.onnx"
    return export_to_onnx(wrapper, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, path)


def test_one_file_bytes_are_what_onnx_save_model_writes(exported, tmp_path) -> None:
    model = onnx.load(str(exported))
    onnx.save_model(model, str(tmp_path / "reference.onnx"))
    assert external_data.one_file_bytes(model) == (tmp_path / "reference.onnx").read_bytes()
    external_data.save_onnx(model, tmp_path / "model.onnx")
    assert (tmp_path / "model.onnx").read_bytes() == (tmp_path / "reference.onnx").read_bytes()


def test_one_file_bytes_leave_large_models_to_the_exact_count(exported, monkeypatch) -> None:
    monkeypatch.setattr(external_data, "EXTERNAL_DATA_THRESHOLD_BYTES", 1000)
    assert external_data.one_file_bytes(onnx.load(str(exported))) is None


def test_background_save_writes_the_same_file_and_moves_it(exported, tmp_path) -> None:
    model = onnx.load(str(exported))
    saving = external_data.BackgroundSave.temporary(model, "model.cleaned.onnx")
    folder = saving.path.parent
    target = saving.move_to(tmp_path / "model.cleaned.onnx")
    assert target.read_bytes() == model.SerializeToString()
    assert not folder.exists()
    discarded = external_data.BackgroundSave.temporary(model, "model.cleaned.onnx")
    discarded.discard()
    assert not discarded.path.parent.exists()


def test_background_save_keeps_the_large_layout(exported, tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(external_data, "EXTERNAL_DATA_THRESHOLD_BYTES", 0)
    reference = tmp_path / "reference"
    reference.mkdir()
    external_data.save_onnx(onnx.load(str(exported)), reference / "model.cleaned.onnx")
    saving = external_data.BackgroundSave.temporary(onnx.load(str(exported)), "model.cleaned.onnx")
    assert saving.data is None  # over the (lowered) limit: saved whole in the thread
    saving.move_to(tmp_path / "model.cleaned.onnx")
    for name in ("model.cleaned.onnx", "model.cleaned.onnx.data"):
        assert (tmp_path / name).read_bytes() == (reference / name).read_bytes(), name


def test_background_save_errors_reach_the_caller(exported, tmp_path) -> None:
    saving = external_data.BackgroundSave(onnx.load(str(exported)), tmp_path / "missing" / "model.onnx")
    with pytest.raises(FileNotFoundError):
        saving.wait()
    with pytest.raises(ValueError, match="keeps its name"):
        external_data.BackgroundSave.temporary(onnx.load(str(exported)), "a.onnx").move_to(
            tmp_path / "b.onnx"
        )


def test_session_from_bytes_gives_the_file_sessions_outputs(exported) -> None:
    feeds = {
        "input_ids": np.arange(14, dtype=np.int64).reshape(2, 7) % 100,
        "attention_mask": np.ones((2, 7), dtype=np.int64),
    }
    from_file = sessions.check_session(exported).run(None, feeds)
    from_bytes = sessions.session_from_bytes(exported.read_bytes()).run(None, feeds)
    for a, b in zip(from_file, from_bytes):
        np.testing.assert_array_equal(a, b)


def test_pass_report_json_is_asdict() -> None:
    report = PassReport(
        "fuse-x",
        True,
        {"Add": -2, "applied": 1},
        [{"rule": "r", "layer": "0", "reason": "no"}, {"node": "n", "shape": [1, 2], "weights": {"w": 0}}],
        0.5,
    )
    copied = report.to_json()
    assert copied == dataclasses.asdict(report)
    copied["details"][1]["shape"].append(3)
    assert report.details[1]["shape"] == [1, 2]  # a copy, as asdict gives


def test_causal_lm_agreement_is_that_of_the_selected_rows() -> None:
    rng = np.random.default_rng(0)
    reference = {"logits": rng.normal(size=(3, 5, 11)).astype(np.float32)}
    outputs = {"logits": reference["logits"] + rng.normal(scale=0.5, size=(3, 5, 11)).astype(np.float32)}
    mask = rng.integers(0, 2, size=(3, 5))
    feeds = {"attention_mask": mask, "input_ids": np.zeros((3, 5), dtype=np.int64)}
    real = mask.astype(bool)
    same = reference["logits"][real].argmax(-1) == outputs["logits"][real].argmax(-1)
    got = metrics.agreement("causal-lm", reference, outputs, feeds)
    assert got == {"agreement": float(np.mean(same)), "positions": int(same.size)}
