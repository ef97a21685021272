"""Validation feeds on a task's own terms, built from ordinary (right-padded) token feeds.

- A decoder classifier reads the score at the last non-padding token, found from `pad_token_id` as
  transformers' GenericForSequenceClassification does: it is checked on every sample twice, right-padded
  and left-padded, with the padding holding `pad_token_id`.
- A fill-mask model is judged at masked positions: 15% of each sample's inner real tokens (never the first
  and last, the special tokens) are replaced by the mask token, seeded.
"""

from __future__ import annotations

import numpy as np

MASKED_FRACTION = 0.15


def left_and_right_padded(feeds: dict[str, np.ndarray], pad_token_id: int | None) -> dict[str, np.ndarray]:
    """Each sample right-padded, then the same samples left-padded (2x the samples), padding = pad id."""
    mask = feeds["attention_mask"].astype(bool)
    lengths = mask.sum(axis=1)
    width = mask.shape[1]
    right: dict[str, np.ndarray] = {}
    left: dict[str, np.ndarray] = {}
    for name, array in feeds.items():
        fill = pad_token_id if (name == "input_ids" and pad_token_id is not None) else 0
        r = np.full_like(array, fill)
        lft = np.full_like(array, fill)
        for row, length in enumerate(lengths):
            real = array[row][mask[row]]
            r[row, :length] = real
            lft[row, width - length :] = real
        right[name], left[name] = r, lft
    right["attention_mask"] = (np.arange(width)[None, :] < lengths[:, None]).astype(np.int64)
    left["attention_mask"] = (np.arange(width)[None, :] >= width - lengths[:, None]).astype(np.int64)
    return {name: np.concatenate([right[name], left[name]]) for name in feeds}


def with_masked_tokens(
    feeds: dict[str, np.ndarray], mask_token_id: int | None, seed: int = 0
) -> dict[str, np.ndarray]:
    """15% of each sample's inner real tokens replaced by `mask_token_id` (at least one where there is room)."""
    if mask_token_id is None:
        return feeds
    rng = np.random.default_rng(seed)
    ids = feeds["input_ids"].copy()
    for row, real in enumerate(feeds["attention_mask"].astype(bool)):
        inner = np.flatnonzero(real)[1:-1]
        if inner.size == 0:
            continue
        count = max(1, round(MASKED_FRACTION * inner.size))
        ids[row, rng.choice(inner, size=count, replace=False)] = mask_token_id
    return {**feeds, "input_ids": ids}
