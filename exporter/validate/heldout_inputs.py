"""Held-out inputs for validation: real English text when the model has a tokenizer, else random ids.

The text is CPython's `pydoc_data.topics` (license-clean, ships with Python), taken from the end of
the shipped corpus so it does not overlap the calibration samples drawn from its start.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

import calibration_data
from exporter.model_dir.tokenizer import tokenize


def validation_feeds(
    input_names: list[str],
    tokenizer_path: Path | None,
    vocab_size: int,
    samples: int,
    seq_len: int,
    seed: int = 0,
    padding_side: str | None = None,
) -> dict[str, np.ndarray]:
    """`samples` rows of `seq_len` tokens, with some padding so attention masks are exercised; text is
    padded on `padding_side` (None: the tokenizer's own; see exporter/model_dir/tokenizer.py)."""
    if tokenizer_path is not None:
        texts = calibration_data.default_corpus()[-samples:]
        return tokenize(texts, tokenizer_path, input_names, seq_len, padding_side=padding_side)
    rng = np.random.default_rng(seed)
    lengths = rng.integers(max(1, seq_len // 2), seq_len + 1, size=samples)
    lengths[0] = seq_len
    mask = (np.arange(seq_len)[None, :] < lengths[:, None]).astype(np.int64)
    feeds = {"input_ids": rng.integers(0, vocab_size, size=(samples, seq_len)).astype(np.int64)}
    feeds["attention_mask"] = mask
    if "token_type_ids" in input_names:
        feeds["token_type_ids"] = np.zeros((samples, seq_len), dtype=np.int64)
    return {name: feeds[name] for name in input_names}
