"""Export wrappers for task heads: an HF task model (BertForSequenceClassification, ...) -> the task's
outputs under Optimum's names, computed by transformers' own head code, so what is exported is exactly
what transformers computes: BERT's pooler + classifier, RoBERTa's classification head on `<s>`, the
tied MLM decoder, `qa_outputs` split into start/end logits, and for decoders the `score` head read at the
last non-padding token found from `pad_token_id` (transformers' GenericForSequenceClassification, whose
int32 ArgMax ONNX Runtime runs).

Heads read the last hidden state, whose width pruning does not change, so the restructure needs nothing
new: every head is checked through restructure, export, fusion and INT8 like the backbone.
"""

from __future__ import annotations

from torch import nn

from exporter.export.torch_to_onnx import CausalLMForExport, EncoderForExport, additive_padding_mask
from exporter.model_dir.pooling import Pooling
from exporter.tasks.spec import Task


class TaskHeadForExport(nn.Module):
    """(input_ids, attention_mask[, token_type_ids]) -> the head's outputs (`logits`, or `start_logits`
    and `end_logits`). Encoders get the additive [B, 1, 1, S] padding mask (see EncoderForExport); decoders
    the 2-D mask, from which transformers builds the causal mask."""

    def __init__(self, model: nn.Module, task: Task, uses_token_type_ids: bool) -> None:
        super().__init__()
        self.model = model
        self.encoder = task.kind == "encoder"
        self.uses_token_type_ids = uses_token_type_ids and self.encoder
        self.output_names = list(task.outputs)
        self.input_names = ["input_ids", "attention_mask"] + (
            ["token_type_ids"] if self.uses_token_type_ids else []
        )

    def forward(self, input_ids, attention_mask, token_type_ids=None):  # type: ignore[no-untyped-def]
        if self.encoder:
            dtype = next(self.model.parameters()).dtype
            kwargs = {"input_ids": input_ids, "attention_mask": additive_padding_mask(attention_mask, dtype)}
            if self.uses_token_type_ids:
                kwargs["token_type_ids"] = token_type_ids
        else:
            kwargs = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": False}
        out = self.model(**kwargs)
        values = tuple(getattr(out, name) for name in self.output_names)
        return values[0] if len(values) == 1 else values


def wrapper_for(
    task: Task, model: nn.Module, uses_token_type_ids: bool, pooling: Pooling | None
) -> nn.Module:
    """The module whose outputs are checked and exported for `task` (a causal LM's reference is its cache-less
    logits, also when it is exported with a KV cache: then with positions counted over real tokens, as its
    generation counts them for left-padded prompts)."""
    if task.metric == "embedding":
        return EncoderForExport(model, uses_token_type_ids, pooling if task.needs_pooling else None).eval()
    if task.metric == "causal-lm":
        return CausalLMForExport(model, positions_from_mask=task.with_past).eval()
    return TaskHeadForExport(model, task, uses_token_type_ids).eval()
