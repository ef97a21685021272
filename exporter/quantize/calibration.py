"""Calibration data at the export's shapes: the samples INT8 ranges are measured on, plus a held-out split.

Sources (`load_calibration(source=...)`):
- `None`: the shipped English corpus (`calibration_data.default_corpus`), tokenized with the model's tokenizer;
- a `.txt` file (one sample per line) or `.jsonl` file (`{"text": ...}` per line), tokenized likewise;
- a `.npz` file with arrays named as the model's inputs (first axis = samples), used as given;
- `"random"`: random token ids, only when asked for explicitly (ranges from random ids are poor).
Text needs a tokenizer: a model without one and without `--calibration` is an `InputError`.

The held-out split is never used for ranges or for choosing which layers stay in high precision, so the
accuracy reported on it is an honest estimate.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

import calibration_data
from export_errors import InputError
from exporter.model_dir.tokenizer import tokenize

logger = logging.getLogger(__name__)

RANDOM = "random"
DEFAULT_NUM_SAMPLES = 256
DEFAULT_HELDOUT = 64


@dataclasses.dataclass
class CalibrationData:
    """Model feeds (name -> array, first axis = samples) for calibration and for the held-out check."""

    calibration: dict[str, np.ndarray]
    heldout: dict[str, np.ndarray]
    batch: int
    source: str
    # Further feed groups per split ("calibration" / "heldout") over the same samples in the same order,
    # each with its own shapes: a KV-cache decoder's decode steps, whose past grows by one per step, cannot
    # share one array with the prefill. `batches` yields the main feeds' batches, then each group's.
    groups: dict[str, list[dict[str, np.ndarray]]] = dataclasses.field(default_factory=dict)
    group_batch: int | None = None  # samples per feed in the groups (None: `batch`)

    @property
    def num_calibration(self) -> int:
        return _count(self.calibration)

    @property
    def num_heldout(self) -> int:
        return _count(self.heldout)

    def batches(
        self, split: str = "calibration", limit: int | None = None
    ) -> Iterator[dict[str, np.ndarray]]:
        """Feeds of `batch` samples from `split` ("calibration" or "heldout"), the first `limit` samples."""
        for feeds, batch in self._groups(split):
            total = min(_count(feeds), limit) if limit else _count(feeds)
            for start in range(0, total, batch):
                stop = min(start + batch, total)
                yield {name: array[start:stop] for name, array in feeds.items()}

    def judge_batches(
        self, split: str = "calibration", limit: int | None = None, batch: int = 8, chunk: int | None = None
    ) -> list[dict[str, np.ndarray]]:
        """The same samples as `batches(split, limit)`, for runs whose outputs are judged on real tokens only:
        the main feeds sorted by real length into batches of `batch`, each cut to the columns where some
        sample has a real token. Text is padded to the full sequence length (most calibration samples are far
        shorter: 40 of 128 tokens on the demo's corpus), and a padded position changes no real token's output
        (masked out of attention), so this computes the same real tokens at a fraction of the cost. Leading
        (left-padding) columns go only when the feeds carry `position_ids`: a graph that counts positions from
        the first slot would shift a left-padded row's real tokens. Feeds without a [samples, sequence] mask, and the groups (decode
        steps), are batched as `batches` does. `chunk` (a multiple of `batch`): sorted within each run of `chunk`
        samples instead of across all, so that the first k chunks' batches hold exactly the first k * `chunk`
        samples (the split is shuffled: a random subset, for a judge that may stop early)."""
        out: list[dict[str, np.ndarray]] = []
        for index, (feeds, group_batch) in enumerate(self._groups(split)):
            total = min(_count(feeds), limit) if limit else _count(feeds)
            head = {name: array[:total] for name, array in feeds.items()}
            if index > 0 or not _trimmable(head):
                out.extend(
                    {name: array[start : start + group_batch] for name, array in head.items()}
                    for start in range(0, total, group_batch)
                )
                continue
            mask = head["attention_mask"]
            lengths = mask.sum(axis=1)
            if chunk is not None and (chunk <= 0 or chunk % batch):
                raise ValueError(f"chunk {chunk} is not a positive multiple of the batch {batch}")
            span = chunk or max(total, 1)
            runs = [
                start + np.argsort(lengths[start : start + span], kind="stable")
                for start in range(0, total, span)
            ]
            order = np.concatenate(runs) if runs else np.zeros(0, dtype=np.int64)
            for start in range(0, total, batch):
                rows = order[start : start + batch]
                used = np.flatnonzero(mask[rows].any(axis=0))
                first = int(used[0]) if used.size and "position_ids" in head else 0  # see below
                cols = slice(first, int(used[-1]) + 1 if used.size else 1)
                out.append(
                    {
                        name: array[rows][:, cols] if name in SEQUENCE_INPUTS else array[rows]
                        for name, array in head.items()
                    }
                )
        return out

    def num_batches(self, split: str = "calibration", limit: int | None = None) -> int:
        """How many feeds `batches(split, limit)` yields (all groups)."""
        counts = [(_count(feeds), batch) for feeds, batch in self._groups(split)]
        return sum(-(-(min(c, limit) if limit else c) // batch) for c, batch in counts)

    def _groups(self, split: str) -> list[tuple[dict[str, np.ndarray], int]]:
        main = self.calibration if split == "calibration" else self.heldout
        extra = self.groups.get(split, [])
        return [(main, self.batch)] + [(feeds, self.group_batch or self.batch) for feeds in extra]

    def describe(self) -> dict[str, object]:
        return {
            "source": self.source,
            "calibration_samples": self.num_calibration,
            "heldout_samples": self.num_heldout,
            "batch": self.batch,
            "shapes": _shapes(self.calibration),
            **(
                {"group_shapes": [_shapes(g) for g in steps]}
                if (steps := self.groups.get("calibration"))
                else {}
            ),
        }


def load_calibration(
    source: str | Path | None,
    tokenizer_path: str | Path | None,
    input_names: list[str],
    batch: int,
    seq_len: int,
    num_samples: int = DEFAULT_NUM_SAMPLES,
    num_heldout: int = DEFAULT_HELDOUT,
    seed: int = 0,
    vocab_size: int | None = None,
    padding_side: str | None = None,
) -> CalibrationData:
    """Load, tokenize and split calibration samples: `num_samples` for calibration, `num_heldout` held out.
    Text is padded on `padding_side` (None: the tokenizer's own; causal LMs pass "left").

    Fewer samples than asked: the held-out split gets a quarter of them (at least one sample each way).
    """
    if source is not None and str(source) == RANDOM:
        count = num_samples + num_heldout
        feeds, name = random_feeds(input_names, count, seq_len, seed, vocab_size), RANDOM
    elif source is not None and Path(source).suffix == ".npz":
        feeds, name = calibration_data.read_npz(Path(source), input_names), str(source)
    else:
        texts, name = _texts(source)
        keep = np.random.default_rng(seed).permutation(len(texts))[: num_samples + num_heldout]
        texts = [texts[i] for i in sorted(keep)]  # tokenize only what is used
        feeds = tokenize(texts, tokenizer_path, input_names, seq_len, where=source, padding_side=padding_side)
    return split(feeds, num_samples, num_heldout, batch, name, seed)


def random_feeds(
    input_names: list[str], count: int, seq_len: int, seed: int = 0, vocab_size: int | None = None
) -> dict[str, np.ndarray]:
    """Random token ids (1000..1999, or 1..vocab_size-1 for a small vocabulary), random lengths;
    attention mask and token types to match."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(max(2, seq_len // 4), seq_len + 1, size=count)
    mask = (np.arange(seq_len)[None, :] < lengths[:, None]).astype(np.int64)
    feeds = {}
    for name in input_names:
        if name == "attention_mask":
            feeds[name] = mask
        elif name == "token_type_ids":
            feeds[name] = np.zeros((count, seq_len), dtype=np.int64)
        else:
            low, high = (1000, 2000) if vocab_size is None or vocab_size > 2000 else (1, vocab_size)
            feeds[name] = rng.integers(low, high, size=(count, seq_len)).astype(np.int64) * mask
    return feeds


def split(
    feeds: dict[str, np.ndarray], num_samples: int, num_heldout: int, batch: int, source: str, seed: int = 0
) -> CalibrationData:
    """Shuffle (seeded) and split into calibration and held-out samples."""
    total = _count(feeds)
    if total < 2:
        raise InputError(source, f"need at least 2 calibration samples (one held out), got {total}")
    if num_samples + num_heldout > total:
        num_heldout = max(1, min(num_heldout, total // 4))
        num_samples = total - num_heldout
        logger.info(
            "calibration: %d samples available; %d calibrate, %d held out", total, num_samples, num_heldout
        )
    order = np.random.default_rng(seed).permutation(total)
    cal, held = order[:num_samples], order[num_samples : num_samples + num_heldout]
    return CalibrationData(
        calibration={k: v[cal] for k, v in feeds.items()},
        heldout={k: v[held] for k, v in feeds.items()},
        batch=batch,
        source=source,
    )


def _texts(source: str | Path | None) -> tuple[list[str], str]:
    if source is None:
        return calibration_data.default_corpus(), "default English corpus (CPython pydoc_data.topics)"
    path = Path(source)
    if not path.is_file():
        raise InputError(path, "calibration file not found (expected .txt, .jsonl, .npz or 'random')")
    if path.suffix == ".jsonl":
        return calibration_data.read_jsonl(path), str(path)
    if path.suffix == ".txt":
        return calibration_data.read_txt(path), str(path)
    raise InputError(path, f"unsupported calibration format {path.suffix!r} (expected .txt, .jsonl, .npz)")


# Inputs laid out [samples, sequence] like the attention mask; anything else must be an empty past.
SEQUENCE_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "position_ids")


def _trimmable(feeds: dict[str, np.ndarray]) -> bool:
    """Whether padding columns can be cut: a 2-D mask, every sequence input shaped like it, and any other
    input an empty past (`past_key_values.*` with no positions yet)."""
    mask = feeds.get("attention_mask")
    if mask is None or mask.ndim != 2:
        return False
    for name, array in feeds.items():
        if name in SEQUENCE_INPUTS:
            if array.shape != mask.shape:
                return False
        elif not (name.startswith("past_key_values.") and array.ndim == 4 and array.shape[2] == 0):
            return False
    return True


def _shapes(feeds: dict[str, np.ndarray]) -> dict[str, list[int]]:
    """Per input, its shape after the sample axis."""
    return {name: list(array.shape[1:]) for name, array in feeds.items()}


def _count(feeds: dict[str, np.ndarray]) -> int:
    return next(iter(feeds.values())).shape[0] if feeds else 0


def load_stage_calibration(
    config: Any,
    tokenizer_path: str | Path | None,
    input_names: list[str],
    sequence_length: int,
    vocab_size: int | None,
    padding_side: str | None = None,
) -> CalibrationData:
    """The samples the INT8 and INT4 stages calibrate and judge on, from the export's flags (`--calibration`,
    `--batch-size`, `--calibration-samples`, `--seed`): one call, so both stages read the same text."""
    return load_calibration(
        config.calibration,
        tokenizer_path,
        input_names,
        config.batch_size,
        sequence_length,
        num_samples=config.calibration_samples,
        seed=config.seed,
        vocab_size=vocab_size,
        padding_side=padding_side,
    )
