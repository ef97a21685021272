"""Rebuild `default_corpus.txt` from CPython's `pydoc_data.topics` (PSF licence, ships with Python).

Why this text: it is real English prose, license-clean, and present on every Python install, so the
shipped file can be regenerated and checked anywhere. Only prose paragraphs are kept (code blocks,
grammar rules and headings dropped); paragraphs are split into sentences and packed into samples of
1-4 sentences, so the samples span short and long sequences, as real inputs do.

Run: python -m calibration_data.build_default_corpus
"""

from __future__ import annotations

import re
from pathlib import Path

CORPUS_PATH = Path(__file__).with_name("default_corpus.txt")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"(])")


def prose_paragraphs(text: str) -> list[str]:
    """Unindented paragraphs of a pydoc topic, without headings, code and tables."""
    paragraphs, current = [], []
    for line in [*text.splitlines(), ""]:
        if line.strip() and not line.startswith((" ", "\t")) and not set(line.strip()) <= set("*=-+|"):
            current.append(line.strip())
            continue
        if len(current) > 1 or (current and len(current[0]) > 60):
            paragraphs.append(" ".join(current))
        current = []
    return [p for p in paragraphs if not p.endswith(":") or len(p) > 80]


def samples(paragraph: str, index: int) -> list[str]:
    """Pack a paragraph's sentences into samples of 1 to 4 sentences (varied by `index`)."""
    sentences = [s for s in _SENTENCE_END.split(paragraph) if len(s.split()) >= 4]
    size = 1 + index % 4
    return [" ".join(sentences[i : i + size]) for i in range(0, len(sentences), size)]


def build() -> list[str]:
    from pydoc_data.topics import topics

    out: list[str] = []
    for name in sorted(topics):
        for paragraph in prose_paragraphs(topics[name]):
            out.extend(samples(paragraph, len(out)))
    seen: set[str] = set()
    return [s for s in out if not (s in seen or seen.add(s))]  # type: ignore[func-returns-value]


if __name__ == "__main__":
    lines = build()
    CORPUS_PATH.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {len(lines)} samples to {CORPUS_PATH}")
