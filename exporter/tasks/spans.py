"""Extractive QA: the best answer span from start/end logits, as transformers' question-answering pipeline
chose it (transformers 4; version 5 dropped the pipeline, the decoding is kept here).

Non-context tokens (question, special tokens, padding) are excluded, start and end logits go through a
softmax each, and the span (start <= end, at most `max_answer_len` tokens) with the largest product of
probabilities wins; its score is that product.
"""

from __future__ import annotations

import numpy as np

MAX_ANSWER_LEN = 15
EXCLUDED_LOGIT = -10000.0  # what the pipeline wrote over excluded tokens before its softmax


def best_span(
    start_logits: np.ndarray,
    end_logits: np.ndarray,
    allowed: np.ndarray,
    max_answer_len: int = MAX_ANSWER_LEN,
) -> tuple[int, int, float]:
    """(start token, end token, score) of one sample; `allowed` marks the context tokens."""
    allowed = allowed.astype(bool)
    if not allowed.any():
        return 0, 0, 0.0
    start = _softmax(np.where(allowed, start_logits.astype(np.float64), EXCLUDED_LOGIT))
    end = _softmax(np.where(allowed, end_logits.astype(np.float64), EXCLUDED_LOGIT))
    outer = np.outer(start, end)
    candidates = np.tril(np.triu(outer), max_answer_len - 1)
    candidates[~allowed, :] = 0.0
    candidates[:, ~allowed] = 0.0
    index = int(np.argmax(candidates))
    s, e = np.unravel_index(index, candidates.shape)
    return int(s), int(e), float(candidates[s, e])


def _softmax(x: np.ndarray) -> np.ndarray:
    shifted = np.exp(x - x.max())
    return shifted / shifted.sum()
