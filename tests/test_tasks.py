"""Tasks as data (exporter/tasks): inference from transformers' auto mappings, refusals, feeds, metrics,
eval files. Pure and fast: no export runs here (tests/test_task_heads.py exports)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from export_errors import InputError
from exporter.cli import TASK_CHOICES
from exporter.tasks import feeds as task_feeds
from exporter.tasks import metrics, spans
from exporter.tasks.eval_data import read_eval_data
from exporter.tasks.registry import TASK_NAMES, architecture_for, architecture_task, choose_task, find_task

CONFIG = Path("config.json")


def chosen(model_type: str, architectures: list[str] | None, **kwargs: object) -> str:
    defaults: dict[str, object] = {"override": None, "adapter_task_type": None, "has_pooling": False}
    return choose_task(model_type, architectures, config_file=CONFIG, **{**defaults, **kwargs}).task.name  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("model_type", "architecture", "task"),
    [
        ("bert", "BertForSequenceClassification", "text-classification"),
        ("bert", "BertForTokenClassification", "token-classification"),
        ("bert", "BertForQuestionAnswering", "question-answering"),
        ("bert", "BertForMaskedLM", "fill-mask"),
        ("bert", "BertModel", "feature-extraction"),
        ("roberta", "RobertaForSequenceClassification", "text-classification"),
        ("roberta", "RobertaForMaskedLM", "fill-mask"),
        ("llama", "LlamaForCausalLM", "text-generation-with-past"),
        ("llama", "LlamaForSequenceClassification", "text-classification"),
        ("qwen2", "Qwen2ForSequenceClassification", "text-classification"),
        ("mistral", "MistralForCausalLM", "text-generation-with-past"),
    ],
)
def test_task_is_inferred_from_transformers_auto_mappings(model_type, architecture, task) -> None:
    assert architecture_task(architecture) == task
    assert chosen(model_type, [architecture]) == task
    assert architecture_for(find_task(task, model_type), model_type) == architecture


def test_precedence_task_flag_then_adapter_then_architecture_then_default() -> None:
    assert chosen("bert", ["BertForMaskedLM"], override="feature-extraction") == "feature-extraction"
    assert chosen("bert", ["BertForMaskedLM"], adapter_task_type="SEQ_CLS") == "text-classification"
    assert chosen("bert", ["BertModel"], has_pooling=True) == "sentence-similarity"
    assert chosen("bert", None) == "feature-extraction"
    assert chosen("qwen2", None) == "text-generation-with-past"
    assert chosen("llama", ["LlamaForCausalLM"], adapter_task_type="SEQ_CLS") == "text-classification"
    # a checkpoint with a head of its own is that task: another head in the adapter is refused later
    assert chosen("bert", ["BertForQuestionAnswering"], adapter_task_type="TOKEN_CLS") == "question-answering"


@pytest.mark.parametrize(
    ("model_type", "architectures", "override", "message"),
    [
        ("llama", ["LlamaForTokenClassification"], None, "llama cannot be exported for token-classification"),
        (
            "llama",
            None,
            "fill-mask",
            "it can: text-generation-with-past, text-generation, text-classification",
        ),
        ("bert", ["BertForMultipleChoice"], None, "bert cannot be exported for multiple-choice"),
        ("bert", ["BertForPreTraining"], None, "it can: feature-extraction, sentence-similarity, fill-mask"),
        ("bert", ["NotAModel"], None, "'NotAModel' is not a transformers class"),
        ("bert", None, "sentence-similarity", "needs a sentence-transformers pooling"),
    ],
)
def test_a_task_the_family_cannot_do_is_refused_with_the_list(
    model_type, architectures, override, message
) -> None:
    with pytest.raises(InputError, match=message):
        chosen(model_type, architectures, override=override)


def test_cli_task_choices_are_the_registry() -> None:
    assert tuple(TASK_CHOICES) == TASK_NAMES


def test_output_names_and_axes_follow_optimum() -> None:
    qa = find_task("question-answering", "bert")
    assert qa.outputs == ("start_logits", "end_logits")
    assert qa.dynamic_axes(["input_ids"])["start_logits"] == {0: "batch_size", 1: "sequence_length"}
    cls = find_task("text-classification", "llama")
    assert cls.dynamic_axes(["input_ids", "attention_mask"])["logits"] == {0: "batch_size"}
    assert find_task("sentence-similarity", "bert").outputs == ("last_hidden_state", "sentence_embedding")
    assert find_task("text-generation-with-past", "qwen2").with_past


def test_decoder_classifier_feeds_are_left_and_right_padded() -> None:
    feeds = {
        "input_ids": np.array([[5, 6, 7, 0], [8, 9, 3, 4]]),
        "attention_mask": np.array([[1, 1, 1, 0], [1, 1, 1, 1]]),
    }
    out = task_feeds.left_and_right_padded(feeds, pad_token_id=2)
    assert out["input_ids"].tolist() == [[5, 6, 7, 2], [8, 9, 3, 4], [2, 5, 6, 7], [8, 9, 3, 4]]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 1, 1, 1], [0, 1, 1, 1], [1, 1, 1, 1]]


def test_fill_mask_feeds_mask_inner_real_tokens_only() -> None:
    ids = np.arange(2 * 20).reshape(2, 20) + 10
    mask = np.ones((2, 20), dtype=np.int64)
    mask[1, 12:] = 0
    out = task_feeds.with_masked_tokens({"input_ids": ids, "attention_mask": mask}, mask_token_id=4)
    masked = out["input_ids"] == 4
    assert masked[0].sum() == 3 and masked[1].sum() == 2  # 15% of 18 and of 10 inner tokens
    assert not masked[:, 0].any() and not masked[0, 19] and not masked[1, 11:].any()


def test_agreement_metrics_count_what_differs() -> None:
    ref = np.array([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0], [1.0, 0.0, 4.0], [0.0, 0.0, 1.0]])
    out = ref.copy()
    out[3] = [2.0, 0.0, 1.0]
    feeds = {"attention_mask": np.ones((4, 3), dtype=np.int64)}
    result = metrics.agreement("classification", {"logits": ref}, {"logits": out}, feeds)
    assert result["agreement"] == 0.75 and result["max_probability_difference"] > 0.3
    start = np.array([[0.0, 5.0, 1.0], [3.0, 0.0, 9.0]])  # row 1: the max is a padded position
    feeds = {"attention_mask": np.array([[1, 1, 1], [1, 1, 0]])}
    moved = start.copy()
    moved[0] = [0.0, 1.0, 5.0]
    qa = metrics.agreement(
        "question-answering",
        {"start_logits": start, "end_logits": start},
        {"start_logits": moved, "end_logits": start},
        feeds,
    )
    assert qa == {"agreement": 0.5, "start_agreement": 0.5, "end_agreement": 1.0, "samples": 2}


def test_accuracy_and_macro_f1_by_hand() -> None:
    # class 0: tp 1 fp 1 fn 1 -> f1 0.5; class 1: tp 1 fp 0 fn 1 -> 2/3; class 2: tp 0 fp 1 fn 0 -> 0
    result = metrics.accuracy_and_macro_f1([0, 0, 1, 2], [0, 1, 1, 0])
    assert result["accuracy"] == 0.5
    assert result["f1"] == pytest.approx((0.5 + 2 / 3 + 0.0) / 3)
    squad = metrics.squad_scores(["the Eiffel tower", "blue"], [["Eiffel Tower"], ["red", "dark blue"]])
    assert squad["accuracy"] == 0.5 and squad["f1"] == pytest.approx((1.0 + 2 / 3) / 2)


def test_best_span_is_the_pipelines_choice() -> None:
    start = np.array([9.0, 0.0, 3.0, 1.0, 0.0])
    end = np.array([9.0, 0.0, 0.0, 1.0, 4.0])
    allowed = np.array([False, True, True, True, True])  # token 0 (e.g. CLS) is not in the context
    s, e, score = spans.best_span(start, end, allowed)
    assert (s, e) == (2, 4) and 0 < score < 1
    assert spans.best_span(start, end, allowed, max_answer_len=2)[:2] == (3, 4)  # 0.11*0.92 > 0.84*0.05


def write_lines(path: Path, *lines: object) -> Path:
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return path


@pytest.mark.parametrize(
    ("metric", "line", "message"),
    [
        ("classification", "{not json", "line 2: not JSON"),
        ("classification", {"text": "a"}, 'line 2: missing "label"'),
        ("classification", {"text": "a", "label": "maybe"}, "line 2: label 'maybe' is not one of the model's labels"),
        ("classification", {"text": "a", "label": 7}, "line 2: label 7 is outside the model's 2 classes"),
        ("token-classification", {"tokens": ["a", "b"], "labels": ["no"]}, "line 2: \"labels\" must be a list with one label per word"),
        ("question-answering", {"question": "q", "context": "abc", "answers": {"text": ["b"], "answer_start": [0]}}, "line 2: answer 'b' is not at answer_start 0"),
    ],
)  # fmt: skip
def test_bad_eval_files_name_the_line(tmp_path, metric, line, message) -> None:
    good = {
        "classification": {"text": "fine", "label": "no"},
        "token-classification": {"tokens": ["a"], "labels": ["no"]},
        "question-answering": {
            "question": "q",
            "context": "abc",
            "answers": {"text": ["a"], "answer_start": [0]},
        },
    }[metric]
    path = write_lines(tmp_path / "eval.jsonl", good, line)
    with pytest.raises(InputError, match=message) as info:
        read_eval_data(path, metric, "task", {"no": 0, "yes": 1})
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_eval_file_reads_labels_by_name_or_index(tmp_path) -> None:
    path = write_lines(
        tmp_path / "eval.jsonl",
        {"text": "a", "label": "yes"},
        "",
        {"text": "b", "text_pair": "c", "label": 0},
    )
    records = read_eval_data(path, "classification", "text-classification", {"no": 0, "yes": 1})
    assert [(r["text"], r["text_pair"], r["label"]) for r in records] == [("a", None, 1), ("b", "c", 0)]
    with pytest.raises(InputError, match="fill-mask has no labeled format"):
        read_eval_data(path, "fill-mask", "fill-mask", {})
