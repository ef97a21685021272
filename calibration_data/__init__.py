"""Calibration text and arrays: the shipped default English corpus and readers for the user's own data.

The default corpus (`default_corpus.txt`, built by `build_default_corpus.py`) is prose from CPython's
`pydoc_data.topics`: licence-clean English that ships with Python. Readers here only parse files;
tokenization at the export's shapes is `exporter.quantize.calibration`'s job.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import numpy as np

from export_errors import InputError

DEFAULT_CORPUS = "default_corpus.txt"


def default_corpus() -> list[str]:
    """The shipped English samples, one per line."""
    text = resources.files(__package__).joinpath(DEFAULT_CORPUS).read_text(encoding="utf-8")
    return [line for line in text.splitlines() if line.strip()]


def read_txt(path: Path) -> list[str]:
    """One sample per non-empty line."""
    lines = [line for line in _read(path).splitlines() if line.strip()]
    if not lines:
        raise InputError(path, "no text samples (expected one sample per non-empty line)")
    return lines


def read_jsonl(path: Path) -> list[str]:
    """One JSON object per line with a string field "text"."""
    texts = []
    for number, line in enumerate(_read(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(path, f"line {number}: not JSON ({exc.msg})") from exc
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise InputError(path, f'line {number}: expected an object with a string field "text"')
        texts.append(record["text"])
    if not texts:
        raise InputError(path, "no samples")
    return texts


def read_npz(path: Path, input_names: list[str]) -> dict[str, np.ndarray]:
    """Arrays named as the model's inputs, first axis = samples, all with the same sample count."""
    try:
        with np.load(path) as data:
            arrays = {name: data[name] for name in data.files}
    except (OSError, ValueError) as exc:
        raise InputError(path, f"cannot read .npz: {exc}") from exc
    missing = [name for name in input_names if name not in arrays]
    if missing:
        raise InputError(path, f"missing arrays for model inputs {missing}; found {sorted(arrays)}")
    counts = {name: arrays[name].shape[0] if arrays[name].ndim else 0 for name in input_names}
    if len(set(counts.values())) != 1 or 0 in counts.values():
        raise InputError(path, f"arrays must share a non-empty first (sample) axis; got {counts}")
    return {name: arrays[name] for name in input_names}


def _read(path: Path) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(path, f"cannot read calibration text: {exc}") from exc
