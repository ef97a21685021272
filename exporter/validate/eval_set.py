"""`--eval-data`: labeled samples (exporter/tasks/eval_data.py) tokenized into feeds, and how a stage's
outputs on them score against the labels (accuracy and macro-F1; exact match and F1 for QA).

- classification: each text (and text_pair) tokenized as the model's tokenizer does; a decoder classifier's
  samples right-padded with `pad_token_id`;
- token-classification: words tokenized with `is_split_into_words`, each word judged at its first
  sub-token; words cut by `--sequence-length` are not scored (counted in `words_truncated`);
- question-answering: question + context (only the context is truncated), the predicted span decoded as
  transformers' question-answering pipeline did (exporter/tasks/spans.py) and compared as text.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from export_errors import InputError
from exporter.model_dir.tokenizer import load_tokenizer
from exporter.tasks import metrics, spans
from exporter.tasks.eval_data import read_eval_data
from exporter.tasks.spec import Task

BATCH = 16


@dataclasses.dataclass
class EvalSet:
    """Tokenized labeled samples and what is needed to score a stage's outputs on them."""

    path: Path
    metric: str
    feeds: dict[str, np.ndarray]
    gold: list[Any]
    positions: list[list[int]] = dataclasses.field(default_factory=list)  # tagging: first sub-token per word
    offsets: np.ndarray | None = None  # QA: character offsets per token
    contexts: list[str] = dataclasses.field(default_factory=list)
    context_tokens: np.ndarray | None = None  # QA: which tokens belong to the context
    words_truncated: int = 0

    @property
    def samples(self) -> int:
        return int(self.feeds["input_ids"].shape[0])

    def batches(self, size: int = BATCH) -> Iterator[dict[str, np.ndarray]]:
        for start in range(0, self.samples, size):
            yield {name: array[start : start + size] for name, array in self.feeds.items()}

    def score(self, outputs: dict[str, np.ndarray]) -> dict[str, Any]:
        """Accuracy and F1 of `outputs` (every sample, in order) against the labels."""
        if self.metric == "classification":
            result = metrics.accuracy_and_macro_f1(metrics.predicted(outputs["logits"]).tolist(), self.gold)
        elif self.metric == "token-classification":
            predicted = metrics.predicted(outputs["logits"])
            pred = [int(predicted[row, p]) for row, where in enumerate(self.positions) for p in where]
            gold = [label for labels in self.gold for label in labels]
            result = metrics.accuracy_and_macro_f1(pred, gold)
            result["words_truncated"] = self.words_truncated
        else:
            result = metrics.squad_scores(self._answers(outputs), self.gold)
        result["f1_kind"] = "squad token F1" if self.metric == "question-answering" else "macro"
        return result

    def _answers(self, outputs: dict[str, np.ndarray]) -> list[str]:
        assert self.offsets is not None and self.context_tokens is not None
        texts = []
        for row, context in enumerate(self.contexts):
            start, end, _ = spans.best_span(
                outputs["start_logits"][row], outputs["end_logits"][row], self.context_tokens[row]
            )
            texts.append(context[int(self.offsets[row, start, 0]) : int(self.offsets[row, end, 1])])
        return texts


def load_eval_set(
    path: Path,
    task: Task,
    tokenizer_path: Path | None,
    config: Any,
    input_names: list[str],
    seq_len: int,
) -> EvalSet:
    """Read `path` for `task` and tokenize it with the model's tokenizer at `seq_len` tokens."""
    label2id = {str(k): int(v) for k, v in (getattr(config, "label2id", None) or {}).items()}
    if task.uses_labels and len(label2id) != int(config.num_labels):
        label2id = {str(config.id2label[i]): i for i in range(int(config.num_labels))}
    records = read_eval_data(path, task.metric, task.name, label2id)
    if tokenizer_path is None:
        raise InputError("--eval-data", "the model folder has no tokenizer, so its text cannot be tokenized")
    tokenizer = task_tokenizer(tokenizer_path, task, getattr(config, "pad_token_id", None))
    common = {"truncation": True, "max_length": seq_len, "padding": "longest", "return_tensors": "np"}
    if task.metric == "classification":
        pairs = [r["text_pair"] for r in records]
        encoded = tokenizer(
            [r["text"] for r in records], pairs if any(p is not None for p in pairs) else None, **common
        )
        return EvalSet(path, task.metric, _feeds(encoded, input_names), [r["label"] for r in records])
    if task.metric == "token-classification":
        return _tagging_set(path, tokenizer, records, input_names, common)
    encoded = tokenizer(
        [r["question"] for r in records],
        [r["context"] for r in records],
        **{**common, "truncation": "only_second"},
        return_offsets_mapping=True,
    )
    context_tokens = np.array([[s == 1 for s in encoded.sequence_ids(i)] for i in range(len(records))])
    return EvalSet(
        path,
        task.metric,
        _feeds(encoded, input_names),
        [r["answers"] for r in records],
        offsets=encoded["offset_mapping"],
        contexts=[r["context"] for r in records],
        context_tokens=context_tokens & encoded["attention_mask"].astype(bool),
    )


def task_tokenizer(tokenizer_path: Path, task: Task, pad_token_id: int | None) -> Any:
    """The model's tokenizer padding on the right (exporter/model_dir/tokenizer.py picks the pad token: its
    own, else eos, else unk); a decoder classifier pads with config.json's `pad_token_id`, the id its score
    head finds the last real token from. Right padding keeps a causal model's real tokens at the positions
    they have alone."""
    tokenizer, _ = load_tokenizer(tokenizer_path, "right")
    if task.metric == "classification" and task.kind == "decoder" and pad_token_id is not None:
        tokenizer.pad_token_id = pad_token_id
    return tokenizer


def _tagging_set(
    path: Path, tokenizer: Any, records: list[dict[str, Any]], input_names: list[str], common: dict[str, Any]
) -> EvalSet:
    encoded = tokenizer([r["tokens"] for r in records], is_split_into_words=True, **common)
    positions, gold, truncated = [], [], 0
    for row, record in enumerate(records):
        first: dict[int, int] = {}
        for position, word in enumerate(encoded.word_ids(row)):
            if word is not None and word not in first:
                first[word] = position
        kept = [w for w in range(len(record["tokens"])) if w in first]
        truncated += len(record["tokens"]) - len(kept)
        positions.append([first[w] for w in kept])
        gold.append([record["labels"][w] for w in kept])
    return EvalSet(
        path, "token-classification", _feeds(encoded, input_names), gold, positions, words_truncated=truncated
    )


def _feeds(encoded: Any, input_names: list[str]) -> dict[str, np.ndarray]:
    feeds = {}
    for name in input_names:
        if name in encoded:
            feeds[name] = np.asarray(encoded[name], dtype=np.int64)
        elif name == "token_type_ids":
            feeds[name] = np.zeros_like(np.asarray(encoded["input_ids"]), dtype=np.int64)
        else:
            raise InputError("--eval-data", f"the tokenizer does not produce model input {name!r}")
    return feeds
