"""The model's own tokenizer: turns text into the model's inputs for calibration and validation.

Loaded with transformers' AutoTokenizer from MODEL_DIR (never trust_remote_code); a folder without
tokenizer files cannot tokenize text, which is an InputError that says what to pass instead.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from export_errors import InputError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "tokenizer.model")


def find_tokenizer(path: Path) -> Path | None:
    """`path` when it holds tokenizer files, else None."""
    return path if any((path / f).exists() for f in TOKENIZER_FILES) else None


def tokenize(
    texts: list[str],
    tokenizer_path: str | Path | None,
    input_names: list[str],
    seq_len: int,
    where: str | Path | None = None,
) -> dict[str, np.ndarray]:
    """Tokenize `texts` with the model's tokenizer, padded and truncated to `seq_len`, int64."""
    if tokenizer_path is None or find_tokenizer(Path(tokenizer_path)) is None:
        raise InputError(
            where or "--calibration",
            f"the model at {tokenizer_path} has no tokenizer, so text cannot be tokenized: pass --calibration "
            "FILE.npz (arrays named as the model inputs) or --calibration random (poor ranges)",
        )
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_path))
    encoded = tokenizer(texts, padding="max_length", truncation=True, max_length=seq_len, return_tensors="np")
    feeds = {}
    for name in input_names:
        if name in encoded:
            feeds[name] = encoded[name].astype(np.int64)
        elif name == "token_type_ids":
            feeds[name] = np.zeros_like(encoded["input_ids"], dtype=np.int64)
        else:
            raise InputError(where or "--calibration", f"the tokenizer does not produce model input {name!r}")
    return feeds
