"""One generation as one timed query, for `engine-bench OUT_DIR` on a KV-cache decoder export.

A single call of a decoder file times one phase: a prefill (empty cache) or one decode step. What a user of
a causal LM waits for is a generation: the prompt, then one token per step with the cache fed back. So for an
export that kept a prefill/decode pair (report.json `deployment.decoder_pair`: the prompt on a dynamic INT8
file, every step on the INT4 one; exporter/quantize/int4_pair.py) engine-bench times `GenerationRunner`s:
the pair, and the decode file alone on the same generation, side by side.

`infer(feeds)`: the feeds' tokens as the prompt on `prefill` (the decode runner where none), then `steps`
greedy steps on `decode`, each fed the previous call's `present.*` as `past_key_values.*`, the attention
mask grown by one and the next position; returns the last step's outputs. Pure numpy around the two
runners (the cache layout is the export's: `present.N.key` -> `past_key_values.N.key`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from engines.base import Runner

DEFAULT_STEPS = 32
PAST, PRESENT = "past_key_values.", "present."


class GenerationRunner(Runner):
    """A prompt on `prefill` (or `decode`) then `steps` greedy decode steps on `decode` (see the module)."""

    backend = "generation"

    def __init__(self, decode: Runner, prefill: Runner | None = None, steps: int = DEFAULT_STEPS) -> None:
        super().__init__()
        self.decode = decode
        self.prefill = prefill
        self.steps = steps

    def _activate(self) -> None:
        self.decode.__enter__()
        if self.prefill is not None:
            self.prefill.__enter__()
        self._inputs = self.decode.input_specs
        self._outputs = self.decode.output_specs

    def _deactivate(self) -> None:
        self.decode.__exit__(None, None, None)
        if self.prefill is not None:
            self.prefill.__exit__(None, None, None)

    def _infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        first = self.prefill if self.prefill is not None else self.decode
        outputs = first.infer(feeds)
        mask = np.asarray(feeds["attention_mask"])
        names = [spec.name for spec in self.decode.input_specs]
        for _ in range(self.steps):
            token = outputs["logits"][:, -1].argmax(axis=-1)[:, None].astype(np.int64)
            mask = np.concatenate([mask, np.ones((mask.shape[0], 1), dtype=mask.dtype)], axis=1)
            step: dict[str, np.ndarray] = {"input_ids": token, "attention_mask": mask}
            if "position_ids" in names:
                step["position_ids"] = (mask.sum(axis=1, keepdims=True) - 1).astype(np.int64)
            for name in names:
                if name.startswith(PAST):
                    step[name] = outputs[PRESENT + name[len(PAST) :]]
            outputs = self.decode.infer(step)
        return outputs


def recorded_pair(out_dir: str | Path) -> tuple[Path, Path] | None:
    """(prefill file, decode file) of report.json's `deployment.decoder_pair`, None where the export kept none
    (or the report is unreadable: engine-bench then times the folder's files as before)."""
    report = Path(out_dir) / "report.json"
    try:
        pair = json.loads(report.read_text()).get("deployment", {}).get("decoder_pair")
    except (OSError, ValueError):
        return None
    if not isinstance(pair, dict) or not pair.get("prefill") or not pair.get("decode"):
        return None
    return Path(out_dir) / pair["prefill"], Path(out_dir) / pair["decode"]
