"""The model's own tokenizer: turns text into the model's inputs for calibration and validation.

Loaded with transformers' AutoTokenizer from MODEL_DIR (never trust_remote_code); a folder without
tokenizer files cannot tokenize text, which is an InputError that says what to pass instead.

Padding. Llama and Mistral tokenizers ship bos/eos (and unk) but no pad token, so batching text fails
inside transformers ("Asking to pad but the tokenizer does not have a padding token"). A padded slot is
masked out (attention_mask 0) and compared nowhere, so any id is exact there: we pad with the tokenizer's
own pad token if it has one, else its eos token, else its unk token (`padding_choice`, the rule HF's own
docs give), and say which in the report. Causal LMs are padded on the left, the side decoder-only
generation pads prompts on (HF `generate`, exporter/runtime/generation.py): position ids then follow
from the mask (`positions_from_mask`), as they do at generation time. Encoders keep their tokenizer's side.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

from export_errors import InputError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "tokenizer.model")
GENERATION_PADDING_SIDE = "left"  # decoder-only generation pads prompts on the left
PADDING_SOURCES = ("pad_token", "eos_token", "unk_token")  # first one the tokenizer has pads


@dataclasses.dataclass(frozen=True)
class Padding:
    """What padded a text batch: the token, its id, which special token it is, and the side."""

    token: str
    id: int
    source: str  # one of PADDING_SOURCES
    side: str  # "left" | "right"

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def find_tokenizer(path: Path) -> Path | None:
    """`path` when it holds tokenizer files, else None."""
    return path if any((path / f).exists() for f in TOKENIZER_FILES) else None


def padding_side_for(is_decoder: bool) -> str | None:
    """The side text batches are padded on: causal LMs pad like generation (left); None keeps the
    tokenizer's own side (encoders)."""
    return GENERATION_PADDING_SIDE if is_decoder else None


def padding_choice(special_tokens: dict[str, str | None]) -> tuple[str, str] | None:
    """(token, source) that pads: the first of pad, eos, unk the tokenizer defines; None if none."""
    for source in PADDING_SOURCES:
        token = special_tokens.get(source)
        if isinstance(token, str) and token:
            return token, source
    return None


def load_tokenizer(tokenizer_path: str | Path, padding_side: str | None = None) -> tuple[Any, Padding]:
    """AutoTokenizer from the folder, made able to pad (`padding_choice`) on `padding_side` (None: its
    own side), and how it pads."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_path))
    choice = padding_choice({source: getattr(tokenizer, source, None) for source in PADDING_SOURCES})
    if choice is None:
        raise InputError(
            Path(tokenizer_path) / "tokenizer_config.json",
            "the tokenizer has no pad, eos or unk token, so text batches cannot be padded: pass "
            "--calibration FILE.npz (arrays named as the model inputs)",
        )
    tokenizer.pad_token = choice[0]
    if padding_side is not None:
        tokenizer.padding_side = padding_side
    return tokenizer, Padding(choice[0], int(tokenizer.pad_token_id), choice[1], str(tokenizer.padding_side))


def tokenize(
    texts: list[str],
    tokenizer_path: str | Path | None,
    input_names: list[str],
    seq_len: int,
    where: str | Path | None = None,
    padding_side: str | None = None,
) -> dict[str, np.ndarray]:
    """Tokenize `texts` with the model's tokenizer, padded (see the module docstring) on `padding_side`
    (None: the tokenizer's own) and truncated to `seq_len`, int64."""
    if tokenizer_path is None or find_tokenizer(Path(tokenizer_path)) is None:
        raise InputError(
            where or "--calibration",
            f"{_no_tokenizer(tokenizer_path)}, so text cannot be tokenized: pass --calibration "
            "FILE.npz (arrays named as the model inputs) or --calibration random (poor ranges)",
        )
    tokenizer, _ = load_tokenizer(tokenizer_path, padding_side)
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


def _no_tokenizer(tokenizer_path: str | Path | None) -> str:
    """Says which folder lacks tokenizer files, never "None" when the model has none at all."""
    if tokenizer_path is None:
        return "the model folder has no tokenizer files (tokenizer.json / tokenizer_config.json)"
    return f"{tokenizer_path} has no tokenizer files (tokenizer.json / tokenizer_config.json)"
