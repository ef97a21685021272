"""How a stage is judged on the task's own terms, against the reference (no labels) or against labels.

Agreement with the reference (every export, no labels needed), "agreement" being the headline number:
- classification: argmax agreement over samples, and the largest probability difference;
- token-classification: argmax agreement over real tokens, and the largest probability difference;
- question-answering: start and end argmax agreement over real tokens; "agreement" needs both;
- fill-mask: top-1 agreement at masked positions (all real tokens when nothing is masked);
- causal-lm: greedy (top-1) agreement at every real token, teacher-forced on the same input;
- embedding: none (the cosine of the outputs judges it; see exporter/validate/compare.py).

With labels (`--eval-data`): accuracy and macro-F1 (the unweighted mean of per-class F1 over the classes in
the labels or the predictions, as scikit-learn's `f1_score(average="macro")`); for extractive QA, exact
match and SQuAD's token F1 of the answer text.
"""

from __future__ import annotations

import collections
import re
import string
from collections.abc import Mapping, Sequence

import numpy as np


def softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    shifted = np.exp(x - x.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x.astype(np.float64)))


def probabilities(logits: np.ndarray) -> np.ndarray:
    """Class probabilities as transformers' pipelines compute them: sigmoid for one label, else softmax."""
    return sigmoid(logits) if logits.shape[-1] == 1 else softmax(logits)


def predicted(logits: np.ndarray) -> np.ndarray:
    """Class per row: argmax, or (one label) whether the logit is positive."""
    return (logits[..., 0] > 0).astype(np.int64) if logits.shape[-1] == 1 else logits.argmax(axis=-1)


def agreement(
    metric: str,
    reference: Mapping[str, np.ndarray],
    outputs: Mapping[str, np.ndarray],
    feeds: Mapping[str, np.ndarray],
    mask_token_id: int | None = None,
) -> dict[str, float]:
    """The task's agreement of `outputs` with `reference` on `feeds` (see the module docstring)."""
    real = feeds["attention_mask"].astype(bool)
    if metric == "classification":
        return _class_agreement(reference["logits"], outputs["logits"])
    if metric == "token-classification":
        return _class_agreement(reference["logits"][real], outputs["logits"][real])
    if metric == "question-answering":
        start = _span_argmax(reference["start_logits"], real) == _span_argmax(outputs["start_logits"], real)
        end = _span_argmax(reference["end_logits"], real) == _span_argmax(outputs["end_logits"], real)
        return {
            "agreement": float(np.mean(start & end)),
            "start_agreement": float(np.mean(start)),
            "end_agreement": float(np.mean(end)),
            "samples": int(start.size),
        }
    if metric in ("fill-mask", "causal-lm"):
        where = real
        if (
            metric == "fill-mask"
            and mask_token_id is not None
            and (feeds["input_ids"] == mask_token_id).any()
        ):
            where = real & (feeds["input_ids"] == mask_token_id)
        # each row's argmax, then the rows kept: no copy of the selected logits ([tokens, vocabulary] each)
        same = reference["logits"].argmax(-1)[where] == outputs["logits"].argmax(-1)[where]
        return {"agreement": float(np.mean(same)), "positions": int(same.size)}
    return {}


def _class_agreement(reference: np.ndarray, outputs: np.ndarray) -> dict[str, float]:
    same = predicted(reference) == predicted(outputs)
    difference = np.abs(probabilities(reference) - probabilities(outputs))
    return {
        "agreement": float(np.mean(same)),
        "max_probability_difference": float(difference.max()) if difference.size else 0.0,
        "samples": int(same.size),
    }


def _span_argmax(logits: np.ndarray, real: np.ndarray) -> np.ndarray:
    return np.where(real, logits, -np.inf).argmax(axis=-1)


# ------------------------------------------------------------------------------------------------ labels


def accuracy_and_macro_f1(predictions: Sequence[int], labels: Sequence[int]) -> dict[str, float]:
    """Accuracy and macro-F1 over the classes present in `labels` or `predictions`."""
    pred, gold = np.asarray(predictions), np.asarray(labels)
    f1s = []
    for cls in np.union1d(pred, gold):
        tp = int(np.sum((pred == cls) & (gold == cls)))
        fp, fn = int(np.sum((pred == cls) & (gold != cls))), int(np.sum((pred != cls) & (gold == cls)))
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return {
        "accuracy": float(np.mean(pred == gold)) if gold.size else 0.0,
        "f1": float(np.mean(f1s)) if f1s else 0.0,
        "samples": int(gold.size),
    }


def squad_scores(predictions: Sequence[str], answers: Sequence[Sequence[str]]) -> dict[str, float]:
    """SQuAD v1 exact match ("accuracy") and token F1 ("f1"), each the best over a sample's gold answers."""
    exact = [
        max(float(_normalize(p) == _normalize(a)) for a in gold) for p, gold in zip(predictions, answers)
    ]
    f1 = [max(_token_f1(p, a) for a in gold) for p, gold in zip(predictions, answers)]
    return {"accuracy": float(np.mean(exact)), "f1": float(np.mean(f1)), "samples": len(exact)}


def _normalize(text: str) -> str:
    """SQuAD's answer normalisation: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def _token_f1(prediction: str, answer: str) -> float:
    pred, gold = _normalize(prediction).split(), _normalize(answer).split()
    common = sum((collections.Counter(pred) & collections.Counter(gold)).values())
    if not pred or not gold:
        return float(pred == gold)
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(gold)
    return 2 * precision * recall / (precision + recall)
