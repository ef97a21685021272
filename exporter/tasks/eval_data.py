"""`--eval-data FILE.jsonl`: labeled samples to measure task accuracy at every stage. One JSON object a line:

- text-classification: `{"text": str, "text_pair": str (optional), "label": str | int}`;
- token-classification: `{"tokens": [str, ...], "labels": [str | int, ...]}`, one label per word (the
  model's prediction for a word is that of its first sub-token, as in transformers' token-classification
  training examples);
- question-answering (SQuAD): `{"question": str, "context": str, "answers": {"text": [str, ...],
  "answer_start": [int, ...]}}`, each answer found at its `answer_start` in the context.
A label is a name from config.json's `id2label` or a class index. Every problem is an InputError naming the
file and the line.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from export_errors import InputError

FORMATS = {
    "classification": '{"text": ..., "text_pair"?: ..., "label": ...}',
    "token-classification": '{"tokens": [...], "labels": [...]}',
    "question-answering": '{"question": ..., "context": ..., "answers": {"text": [...], "answer_start": [...]}}',
}


def read_eval_data(
    path: Path, metric: str, task_name: str, label2id: Mapping[str, int]
) -> list[dict[str, Any]]:
    """The file's samples, labels as class indices; an InputError naming the line on any problem."""
    if metric not in FORMATS:
        raise InputError(
            "--eval-data", f"{task_name} has no labeled format (its agreement with the reference is reported)"
        )
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(path, f"cannot read the evaluation file: {exc}") from exc
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            raw = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(path, f"line {number}: not JSON ({exc.msg})") from exc
        where = f"{path}: line {number}"
        if not isinstance(raw, dict):
            raise InputError(where, f"expected a JSON object {FORMATS[metric]}")
        records.append(_PARSERS[metric](raw, where, label2id))
    if not records:
        raise InputError(path, f"no samples (expected one JSON object a line: {FORMATS[metric]})")
    return records


def _string(raw: dict[str, Any], key: str, where: str, optional: bool = False) -> str | None:
    value = raw.get(key)
    if value is None and optional:
        return None
    if not isinstance(value, str) or not value:
        raise InputError(where, f'"{key}" must be a non-empty string')
    return value


def _label(value: Any, where: str, label2id: Mapping[str, int]) -> int:
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise InputError(where, f"label {value!r} is neither a label name nor a class index")
    if isinstance(value, int):
        if not 0 <= value < len(label2id):
            raise InputError(where, f"label {value} is outside the model's {len(label2id)} classes")
        return value
    if value not in label2id:
        names = ", ".join(sorted(label2id, key=label2id.__getitem__))
        raise InputError(where, f"label {value!r} is not one of the model's labels ({names})")
    return int(label2id[value])


def _classification(raw: dict[str, Any], where: str, label2id: Mapping[str, int]) -> dict[str, Any]:
    if "label" not in raw:
        raise InputError(where, 'missing "label"')
    return {
        "text": _string(raw, "text", where),
        "text_pair": _string(raw, "text_pair", where, optional=True),
        "label": _label(raw["label"], where, label2id),
    }


def _token_classification(raw: dict[str, Any], where: str, label2id: Mapping[str, int]) -> dict[str, Any]:
    tokens, labels = raw.get("tokens"), raw.get("labels")
    if not isinstance(tokens, list) or not tokens or not all(isinstance(t, str) and t for t in tokens):
        raise InputError(where, '"tokens" must be a non-empty list of non-empty strings (the words)')
    if not isinstance(labels, list) or len(labels) != len(tokens):
        raise InputError(where, f'"labels" must be a list with one label per word ({len(tokens)})')
    return {"tokens": tokens, "labels": [_label(label, where, label2id) for label in labels]}


def _question_answering(raw: dict[str, Any], where: str, label2id: Mapping[str, int]) -> dict[str, Any]:
    question, context = _string(raw, "question", where), _string(raw, "context", where)
    answers = raw.get("answers")
    if not isinstance(answers, dict):
        raise InputError(where, '"answers" must be {"text": [...], "answer_start": [...]}')
    texts, starts = answers.get("text"), answers.get("answer_start")
    if not isinstance(texts, list) or not texts or not isinstance(starts, list) or len(starts) != len(texts):
        raise InputError(where, '"answers" needs equally long, non-empty "text" and "answer_start" lists')
    assert context is not None
    for text, start in zip(texts, starts):
        if not isinstance(text, str) or not text or isinstance(start, bool) or not isinstance(start, int):
            raise InputError(where, "each answer is a non-empty string with an integer answer_start")
        if context[start : start + len(text)] != text:
            raise InputError(where, f"answer {text!r} is not at answer_start {start} of the context")
    return {"question": question, "context": context, "answers": texts, "answer_starts": starts}


_PARSERS = {
    "classification": _classification,
    "token-classification": _token_classification,
    "question-answering": _question_answering,
}
