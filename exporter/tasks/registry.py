"""The tasks each family kind can export, and the task a MODEL_DIR asks for.

The table follows Optimum's exporters (task names, output names; `optimum.exporters.tasks.TasksManager`,
optimum-onnx `_TASK_TO_COMMON_OUTPUTS`). The task is chosen, first match wins:
1. `--task`;
2. the adapter's PEFT `task_type` (SEQ_CLS, TOKEN_CLS, QUESTION_ANS, CAUSAL_LM, FEATURE_EXTRACTION) when
   config.json names no head of its own (a base model saved as BertModel, BertForMaskedLM or
   LlamaForCausalLM, fine-tuned into a classifier): the fine-tune is what the user made;
3. config.json's `architectures[0]`, looked up in transformers' own auto-model mappings
   (`MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES`, ...): `BertForSequenceClassification` is
   text-classification, a bare `BertModel` feature-extraction;
4. no architecture: feature-extraction for an encoder, text-generation-with-past for a decoder.
An encoder's feature-extraction becomes sentence-similarity when the folder has a sentence-transformers
pooling. A task the family cannot export is refused with the list it can.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from export_errors import InputError
from exporter.tasks.spec import Kind, Task

ENCODER_TYPES = ("bert", "roberta")
DECODER_TYPES = ("llama", "mistral", "qwen2")
_LOGITS = ("logits",)

TASKS: tuple[Task, ...] = (
    Task(
        "feature-extraction", "encoder", "MODEL_MAPPING_NAMES", ("last_hidden_state",),
        frozenset({"last_hidden_state"}), "embedding", "ORTModelForFeatureExtraction", "feature-extraction",
    ),
    Task(
        "sentence-similarity", "encoder", "MODEL_MAPPING_NAMES", ("last_hidden_state", "sentence_embedding"),
        frozenset({"last_hidden_state"}), "embedding", "ORTModelForFeatureExtraction", "feature-extraction",
        needs_pooling=True,
    ),
    Task(
        "fill-mask", "encoder", "MODEL_FOR_MASKED_LM_MAPPING_NAMES", _LOGITS, frozenset(_LOGITS), "fill-mask",
        "ORTModelForMaskedLM", "fill-mask",
    ),
    Task(
        "text-classification", "encoder", "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES", _LOGITS,
        frozenset(), "classification", "ORTModelForSequenceClassification", "text-classification",
        gate_on_agreement=True, uses_labels=True,
    ),
    Task(
        "token-classification", "encoder", "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES", _LOGITS,
        frozenset(_LOGITS), "token-classification", "ORTModelForTokenClassification", "token-classification",
        gate_on_agreement=True, uses_labels=True,
    ),
    Task(
        "question-answering", "encoder", "MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES",
        ("start_logits", "end_logits"), frozenset({"start_logits", "end_logits"}), "question-answering",
        "ORTModelForQuestionAnswering", None, gate_on_agreement=True,
    ),
    Task(
        "text-generation-with-past", "decoder", "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", _LOGITS,
        frozenset(_LOGITS), "causal-lm", "ORTModelForCausalLM", "text-generation", with_past=True,
    ),
    Task(
        "text-generation", "decoder", "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", _LOGITS, frozenset(_LOGITS),
        "causal-lm", "ORTModelForCausalLM", "text-generation",
    ),
    Task(
        "text-classification", "decoder", "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES", _LOGITS,
        frozenset(), "classification", "ORTModelForSequenceClassification", "text-classification",
        gate_on_agreement=True, uses_labels=True,
    ),
)  # fmt: skip
TASK_NAMES = tuple(dict.fromkeys(t.name for t in TASKS))

# transformers' auto-model mapping -> the task a class in it is trained for (first match wins; classes
# of the last three are recognised only to refuse them by name).
ARCHITECTURE_TASKS: tuple[tuple[str, str], ...] = (
    ("MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES", "text-classification"),
    ("MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES", "token-classification"),
    ("MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES", "question-answering"),
    ("MODEL_FOR_MASKED_LM_MAPPING_NAMES", "fill-mask"),
    ("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", "text-generation-with-past"),
    ("MODEL_MAPPING_NAMES", "feature-extraction"),
    ("MODEL_FOR_MULTIPLE_CHOICE_MAPPING_NAMES", "multiple-choice"),
    ("MODEL_FOR_NEXT_SENTENCE_PREDICTION_MAPPING_NAMES", "next-sentence-prediction"),
    ("MODEL_FOR_PRETRAINING_MAPPING_NAMES", "pretraining"),
)
# PEFT's task_type -> our task
PEFT_TASKS = {
    "SEQ_CLS": "text-classification",
    "TOKEN_CLS": "token-classification",
    "QUESTION_ANS": "question-answering",
    "CAUSAL_LM": "text-generation-with-past",
    "FEATURE_EXTRACTION": "feature-extraction",
}


# tasks whose checkpoint carries a head trained for them: config.json's class then says what the model is
HEAD_TASKS = ("text-classification", "token-classification", "question-answering")


@dataclasses.dataclass(frozen=True)
class ChosenTask:
    task: Task
    source: str  # "--task", "adapter task_type SEQ_CLS", "config.json architectures[0] ...", "default"


def kind_of(model_type: str) -> Kind:
    return "decoder" if model_type in DECODER_TYPES else "encoder"


def tasks_for(kind: Kind) -> list[str]:
    return [t.name for t in TASKS if t.kind == kind]


def find_task(name: str, model_type: str, where: str | Path = "--task") -> Task:
    """The task `name` for `model_type`'s kind, or an InputError listing what the family can export."""
    kind = kind_of(model_type)
    for task in TASKS:
        if task.name == name and task.kind == kind:
            return task
    raise InputError(
        where, f"{model_type} cannot be exported for {name}; it can: {', '.join(tasks_for(kind))}"
    )


def architecture_task(architecture: str) -> str | None:
    """The task transformers' auto-model mappings give `architecture` (e.g. BertForMaskedLM -> fill-mask)."""
    from transformers.models.auto import modeling_auto

    for mapping, task in ARCHITECTURE_TASKS:
        for value in getattr(modeling_auto, mapping).values():
            if architecture == value or (isinstance(value, tuple) and architecture in value):
                return task
    return None


def architecture_for(task: Task, model_type: str) -> str:
    """The transformers class of `task` for `model_type` (e.g. text-classification, llama ->
    LlamaForSequenceClassification): what the reference model is built as and the deployed config names."""
    from transformers.models.auto import modeling_auto

    value = getattr(modeling_auto, task.auto_mapping)[model_type]
    return value[0] if isinstance(value, tuple) else str(value)


def choose_task(
    model_type: str,
    architectures: list[str] | None,
    *,
    override: str | None,
    adapter_task_type: str | None,
    has_pooling: bool,
    config_file: Path,
    adapter_config: Path | None = None,
) -> ChosenTask:
    """The task to export (see the module docstring for the order), checked against the family."""
    from_architecture = architecture_task(architectures[0]) if architectures else None
    if override is not None:
        name, source, where = override, "--task", "--task"
    elif adapter_task_type in PEFT_TASKS and from_architecture not in HEAD_TASKS:
        name = PEFT_TASKS[adapter_task_type]
        source, where = f"adapter task_type {adapter_task_type}", str(adapter_config)
    elif architectures:
        name = from_architecture or "unknown"
        source, where = f"config.json architectures[0] {architectures[0]}", str(config_file)
        if name == "unknown":
            raise InputError(
                config_file,
                f"architectures[0] {architectures[0]!r} is not a transformers class of a task export-engine "
                f"knows; pass --task ({', '.join(tasks_for(kind_of(model_type)))})",
            )
    else:
        name = "feature-extraction" if kind_of(model_type) == "encoder" else "text-generation-with-past"
        source, where = "default (config.json names no architecture)", str(config_file)
    if name == "feature-extraction" and has_pooling and override is None:
        name = "sentence-similarity"
    task = find_task(name, model_type, where)
    if task.needs_pooling and not has_pooling:
        raise InputError(
            where, f"{task.name} needs a sentence-transformers pooling (modules.json + its Pooling folder)"
        )
    return ChosenTask(task, source)


def check_task_config(task: Task, pad_token_id: int | None, architecture: str, where: Path) -> None:
    """What a task needs from config.json beyond its weights."""
    if task.metric == "classification" and task.kind == "decoder" and pad_token_id is None:
        raise InputError(
            where,
            f"pad_token_id is not set: {architecture} finds each sample's last token from it "
            "(set pad_token_id in config.json to the tokenizer's padding id)",
        )
