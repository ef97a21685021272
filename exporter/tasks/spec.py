"""One task object per task: the outputs its model has, which of them are per token, how it is judged.

The API asks the task instead of branching on encoder vs decoder: which outputs to compare on real tokens
only, which agreement metric judges a stage, whether the INT8 gate is on that agreement, whether the export
carries a KV cache, and how validation feeds are prepared (a decoder classifier is checked with left and
right padding; a fill-mask model with masked positions). Names follow Optimum's exporters: task names,
output names (`logits`, `start_logits`/`end_logits`, `last_hidden_state`) and dynamic axes
(`batch_size`, `sequence_length`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Literal

import numpy as np

from exporter.tasks import feeds as task_feeds
from exporter.tasks import metrics

Kind = Literal["encoder", "decoder"]
Metric = Literal[
    "embedding", "classification", "token-classification", "question-answering", "fill-mask", "causal-lm"
]
BATCH, SEQUENCE = "batch_size", "sequence_length"


@dataclasses.dataclass(frozen=True)
class Task:
    """A task for one family kind. `auto_mapping` names transformers' MODEL_FOR_*_MAPPING_NAMES table whose
    class for the model_type builds the model (and is written as the deployed config's architecture)."""

    name: str
    kind: Kind
    auto_mapping: str
    outputs: tuple[str, ...]
    token_outputs: frozenset[str]  # outputs with a sequence axis: judged on real (unpadded) tokens
    metric: Metric
    optimum_class: str  # the Optimum ORTModelFor... class that loads the deployed folder
    pipeline: str | None = None  # the transformers pipeline task serving the same outputs
    with_past: bool = False  # exported with a KV cache (decoder_with_past)
    gate_on_agreement: bool = False  # INT8 gated on the task's held-out agreement as well as on cosine
    uses_labels: bool = False  # config.json's id2label names the output classes
    needs_pooling: bool = False  # sentence-transformers pooling required (sentence_embedding)

    @property
    def padding_side(self) -> str | None:
        """The side text batches are padded on: decoders pad like decoder-only generation (left); None
        keeps an encoder tokenizer's own side (exporter/model_dir/tokenizer.py)."""
        return "left" if self.kind == "decoder" else None

    def dynamic_axes(self, input_names: list[str]) -> dict[str, dict[int, str]]:
        """Optimum's dynamic axes: batch and sequence on inputs and per-token outputs, batch elsewhere."""
        axes = {name: {0: BATCH, 1: SEQUENCE} for name in input_names}
        for name in self.outputs:
            axes[name] = {0: BATCH, 1: SEQUENCE} if name in self.token_outputs else {0: BATCH}
        return axes

    def token_masks(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Per-token outputs are compared on real tokens only: padding is not part of the contract."""
        real = feeds["attention_mask"].astype(bool)
        return {name: real for name in self.outputs if name in self.token_outputs}

    def fp32_masks(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray] | None:
        """What the fp32 checks compare: an encoder's whole output, padded positions included (they are the
        same deterministic function on both sides); a decoder's real tokens only (a left-padded causal row
        attends to nothing, and what it outputs there is not part of a causal LM's contract)."""
        return None if self.kind == "encoder" else self.token_masks(feeds)

    def prepare_feeds(
        self, feeds: dict[str, np.ndarray], pad_token_id: int | None, mask_token_id: int | None
    ) -> dict[str, np.ndarray]:
        """Validation feeds on this task's terms (see exporter/tasks/feeds.py)."""
        if self.metric == "classification" and self.kind == "decoder":
            return task_feeds.left_and_right_padded(feeds, pad_token_id)
        if self.metric == "fill-mask":
            return task_feeds.with_masked_tokens(feeds, mask_token_id)
        return feeds

    def agreement(
        self,
        reference: Mapping[str, np.ndarray],
        outputs: Mapping[str, np.ndarray],
        feeds: Mapping[str, np.ndarray],
        mask_token_id: int | None = None,
    ) -> dict[str, float]:
        """How a stage agrees with the reference on the task's own terms; "agreement" is the headline."""
        return metrics.agreement(self.metric, reference, outputs, feeds, mask_token_id)
