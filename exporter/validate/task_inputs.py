"""Validation feeds on the task's terms: held-out text (or random ids) prepared as the task is judged.

A decoder classifier is checked on every sample right- and left-padded with `pad_token_id`; a fill-mask
model on samples with masked positions (exporter/tasks/feeds.py). The special token ids come from
config.json and the model's tokenizer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from exporter.model_dir.tokenizer import load_tokenizer
from exporter.tasks.spec import Task
from exporter.validate.heldout_inputs import validation_feeds


def special_token_ids(config: Any, tokenizer_path: Path | None) -> tuple[int | None, int | None]:
    """(pad id, mask id): config.json's pad_token_id, else what the tokenizer pads with (its pad, eos or unk
    token); the tokenizer's mask token."""
    pad = getattr(config, "pad_token_id", None)
    mask = None
    if tokenizer_path is not None:
        tokenizer, padding = load_tokenizer(tokenizer_path)
        mask = tokenizer.mask_token_id
        pad = pad if pad is not None else padding.id
    return pad, mask


def task_validation_feeds(
    task: Task,
    input_names: list[str],
    tokenizer_path: Path | None,
    vocab_size: int,
    samples: int,
    seq_len: int,
    special_ids: tuple[int | None, int | None],
    padding_side: str | None = None,
) -> dict[str, np.ndarray]:
    """Held-out validation feeds (exporter/validate/heldout_inputs.py), prepared for `task`."""
    feeds = validation_feeds(
        input_names, tokenizer_path, vocab_size, samples, seq_len, padding_side=padding_side
    )
    return task.prepare_feeds(feeds, *special_ids)
