"""`exporter.load(OUT_DIR)`: an export served for its task, with the folder's own tokenizer.

The engine is the one the export chose (exporter/runtime/engine_choice.py: the TensorRT plan on a GPU, else
the CPU file report.json names), opened through `engines.load_runner`; `file=` picks another file of the
folder (e.g. `model.onnx`, the fp32 graph). Texts are tokenized in batches, padded to the longest, and the
results follow transformers' pipelines on the same model:
- `classify(texts)` -> [{"label", "score"}], softmax (sigmoid for one label), as pipeline("text-classification");
- `tag(texts)` -> per text, [{"entity", "score", "index", "word", "start", "end"}] of every token not labeled
  "O", as pipeline("token-classification") without aggregation;
- `answer(question, context)` -> {"answer", "score", "start", "end"}, the span transformers' question-answering
  pipeline chose (exporter/tasks/spans.py);
- `fill_mask(text)` -> the top-k [{"score", "token", "token_str", "sequence"}] per mask, as pipeline("fill-mask");
- `embed(texts)` -> the sentence embeddings (sentence-similarity), else per text its tokens' hidden states;
- `generate(prompt)` -> the prompt's continuation (greedy unless `do_sample`), with the KV cache when exported
  with one. A decoder classifier's batch is padded on the right (its real tokens keep their positions, as
  when each text runs alone).
- `decoder()` -> a `CachedDecoder` on the serving file: where the export kept a prefill/decode pair
  (`--precision int4`: the prompt on the INT8 file, every step on the INT4 one; engine_choice.py), both files,
  as `generate` runs them.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from engines import load_runner
from engines.base import Runner
from export_errors import InputError
from exporter.model_dir.tokenizer import find_tokenizer
from exporter.runtime.engine_choice import serving_engine
from exporter.runtime.generation import CachedDecoder, generate
from exporter.tasks import spans
from exporter.tasks.metrics import probabilities, softmax
from exporter.tasks.registry import find_task
from exporter.tasks.spec import Task
from exporter.validate.eval_set import task_tokenizer

BATCH_SIZE = 32


def load(out_dir: str | Path, *, file: str | None = None, threads: int | None = None) -> ExportedModel:
    """Open an export for serving: its chosen engine (or `file`) and its tokenizer. Close it (or use it as
    a context manager) to release the engine."""
    return ExportedModel(Path(out_dir), file=file, threads=threads)


class ExportedModel:
    """An exported model ready to serve its task (see the module docstring)."""

    def __init__(self, out_dir: Path, *, file: str | None = None, threads: int | None = None) -> None:
        report_file = out_dir / "report.json"
        if not report_file.is_file():
            raise InputError(out_dir, "not an export-engine output folder (no report.json)")
        self.out_dir = out_dir
        self.report = json.loads(report_file.read_text())
        self.task = find_task(self.report["export"]["task"], self.report["model"]["model_type"], report_file)
        self.serving = serving_engine(out_dir, self.report, file)
        self.path = self.serving.path
        from transformers import AutoConfig

        self.config = AutoConfig.from_pretrained(str(out_dir))
        self.tokenizer = _tokenizer(out_dir, self.task, self.config)
        self.max_length = min(512, int(getattr(self.config, "max_position_embeddings", 512)))
        self.runner: Runner = load_runner(
            self.path,
            backend=self.serving.backend,
            threads=threads if threads is not None else self.serving.threads,
            precision=self.serving.precision,
        )
        self.runner.__enter__()
        self._inputs = [spec.name for spec in self.runner.input_specs]
        self.prefill_runner: Runner | None = None  # the pair's prompt file, where the export kept one
        if self.serving.prefill is not None:
            self.prefill_runner = load_runner(
                self.serving.prefill,
                backend="onnxruntime",
                threads=threads if threads is not None else self.serving.threads,
            )
            self.prefill_runner.__enter__()

    def close(self) -> None:
        self.runner.__exit__(None, None, None)
        if self.prefill_runner is not None:
            self.prefill_runner.__exit__(None, None, None)

    def __enter__(self) -> ExportedModel:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ---------------------------------------------------------------------------------------------- tasks

    def classify(
        self,
        texts: str | Sequence[str],
        text_pairs: Sequence[str] | None = None,
        batch_size: int = BATCH_SIZE,
    ) -> list[dict[str, Any]]:
        """Label and score per text (and text pair), as pipeline("text-classification")."""
        self._require("classify", "classification")
        texts = [texts] if isinstance(texts, str) else list(texts)
        results = []
        for start in range(0, len(texts), batch_size):
            pairs = list(text_pairs[start : start + batch_size]) if text_pairs is not None else None
            logits = self._run(self._encode(texts[start : start + batch_size], pairs))["logits"]
            for scores in self._class_scores(logits):
                best = int(scores.argmax())
                results.append({"label": self.config.id2label[best], "score": float(scores[best])})
        return results

    def tag(self, texts: str | Sequence[str], batch_size: int = BATCH_SIZE) -> list[list[dict[str, Any]]]:
        """Per text, every token's label and score except "O", as pipeline("token-classification")."""
        self._require("tag", "token-classification")
        texts = [texts] if isinstance(texts, str) else list(texts)
        results = []
        for start in range(0, len(texts), batch_size):
            batch = texts[start : start + batch_size]
            encoded = self._tokenize(batch, return_offsets_mapping=True, return_special_tokens_mask=True)
            scores = softmax(self._run(self._feeds(encoded))["logits"])
            for row, text in enumerate(batch):
                results.append(self._entities(text, encoded, row, scores[row]))
        return results

    def answer(self, question: str, context: str) -> dict[str, Any]:
        """The answer span in `context`, as transformers' question-answering pipeline chose it."""
        self._require("answer", "question-answering")
        encoded = self._tokenize([question], [context], truncation="only_second", return_offsets_mapping=True)
        outputs = self._run(self._feeds(encoded))
        allowed = np.array([s == 1 for s in encoded.sequence_ids(0)])
        start, end, score = spans.best_span(outputs["start_logits"][0], outputs["end_logits"][0], allowed)
        begin, finish = int(encoded["offset_mapping"][0][start][0]), int(encoded["offset_mapping"][0][end][1])
        return {"score": score, "start": begin, "end": finish, "answer": context[begin:finish]}

    def fill_mask(self, text: str, top_k: int = 5) -> list[dict[str, Any]] | list[list[dict[str, Any]]]:
        """The top-k tokens for each mask token in `text`, as pipeline("fill-mask")."""
        self._require("fill_mask", "fill-mask")
        encoded = self._tokenize([text])
        ids = np.asarray(encoded["input_ids"][0])
        masked = np.flatnonzero(ids == self.tokenizer.mask_token_id)
        if masked.size == 0:
            raise InputError("fill_mask", f"the text has no {self.tokenizer.mask_token} token")
        probs = softmax(self._run(self._feeds(encoded))["logits"][0, masked])
        rows = []
        for position, row in zip(masked, probs):
            best = np.argsort(-row, kind="stable")[:top_k]
            proposals = []
            for token in best:
                filled = ids.copy()
                filled[position] = token
                filled = filled[filled != self.tokenizer.pad_token_id]
                proposals.append(
                    {
                        "score": float(row[token]),
                        "token": int(token),
                        "token_str": self.tokenizer.decode([int(token)]),
                        "sequence": self.tokenizer.decode(filled, skip_special_tokens=masked.size == 1),
                    }
                )
            rows.append(proposals)
        return rows[0] if len(rows) == 1 else rows

    def embed(
        self, texts: str | Sequence[str], batch_size: int = BATCH_SIZE
    ) -> np.ndarray | list[np.ndarray]:
        """Sentence embeddings [texts, hidden] (sentence-similarity), else per text its real tokens' hidden
        states [tokens, hidden] (as pipeline("feature-extraction"))."""
        self._require("embed", "embedding")
        texts = [texts] if isinstance(texts, str) else list(texts)
        pooled, tokens = [], []
        for start in range(0, len(texts), batch_size):
            feeds = self._encode(texts[start : start + batch_size])
            outputs = self._run(feeds)
            if "sentence_embedding" in outputs:
                pooled.append(outputs["sentence_embedding"])
            else:
                real = feeds["attention_mask"].astype(bool)
                tokens += [hidden[mask] for hidden, mask in zip(outputs["last_hidden_state"], real)]
        return np.concatenate(pooled) if pooled else tokens

    def generate(
        self,
        prompt: str,
        max_new_tokens: int = 32,
        *,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int | None = None,
        seed: int | None = None,
    ) -> str:
        """The continuation of `prompt` (new text only), stopping at the generation config's EOS."""
        self._require("generate", "causal-lm")
        ids = np.asarray(self.tokenizer(prompt, return_tensors="np")["input_ids"], dtype=np.int64)
        eos = _eos_token_id(self.out_dir, self.config)
        if self.task.with_past:
            tokens = generate(
                self.runner,
                ids,
                max_new_tokens=max_new_tokens,
                do_sample=do_sample,
                temperature=temperature,
                top_k=top_k,
                seed=seed,
                eos_token_id=eos,
                prefill=self.prefill_runner,
            )
        else:
            tokens = self._generate_without_cache(ids, max_new_tokens, eos)
        return str(self.tokenizer.decode(tokens[0, ids.shape[1] :], skip_special_tokens=True))

    def decoder(self) -> CachedDecoder:
        """The KV cache of one generation on the serving file(s): `reset(batch)`, then `forward(ids)`; the
        first call runs on the pair's prefill file where the export kept one."""
        if self.task.metric != "causal-lm" or not self.task.with_past:
            raise InputError("decoder", f"this export is a {self.task.name} model without a KV cache")
        return CachedDecoder(self.runner, prefill=self.prefill_runner)

    # ------------------------------------------------------------------------------------------- helpers

    def _require(self, method: str, metric: str) -> None:
        if self.task.metric != metric:
            raise InputError(
                method, f"this export is a {self.task.name} model; {method}() serves another task"
            )
        if self.tokenizer is None:
            raise InputError(self.out_dir, "the export has no tokenizer files, so text cannot be served")

    def _tokenize(self, texts: list[str], pairs: list[str] | None = None, **kwargs: Any) -> Any:
        kwargs.setdefault("truncation", True)
        return self.tokenizer(
            texts, pairs, padding=True, max_length=self.max_length, return_tensors="np", **kwargs
        )

    def _encode(self, texts: list[str], pairs: list[str] | None = None) -> dict[str, np.ndarray]:
        return self._feeds(self._tokenize(texts, pairs))

    def _feeds(self, encoded: Any) -> dict[str, np.ndarray]:
        feeds = {}
        for name in self._inputs:
            if name in encoded:
                feeds[name] = np.asarray(encoded[name], dtype=np.int64)
            elif name == "token_type_ids":
                feeds[name] = np.zeros_like(np.asarray(encoded["input_ids"]), dtype=np.int64)
            else:
                raise InputError(self.path, f"the tokenizer does not produce the model input {name!r}")
        return feeds

    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.runner.infer(feeds)

    def _class_scores(self, logits: np.ndarray) -> np.ndarray:
        """Scores as the text-classification pipeline applies them (config.problem_type first)."""
        problem = getattr(self.config, "problem_type", None)
        if problem == "regression":
            return logits.astype(np.float64)
        if problem == "multi_label_classification":
            return 1.0 / (1.0 + np.exp(-logits.astype(np.float64)))
        return probabilities(logits)

    def _entities(self, text: str, encoded: Any, row: int, scores: np.ndarray) -> list[dict[str, Any]]:
        ids = encoded["input_ids"][row]
        offsets, special = encoded["offset_mapping"][row], encoded["special_tokens_mask"][row]
        real = encoded["attention_mask"][row]
        entities = []
        for index, token_scores in enumerate(scores):
            if special[index] or not real[index]:
                continue
            best = int(token_scores.argmax())
            label = self.config.id2label[best]
            if label == "O":
                continue
            start, end = int(offsets[index][0]), int(offsets[index][1])
            word = self.tokenizer.convert_ids_to_tokens(int(ids[index]))
            if int(ids[index]) == self.tokenizer.unk_token_id:
                word = text[start:end]
            entities.append(
                {
                    "entity": label,
                    "score": float(token_scores[best]),
                    "index": index,
                    "word": word,
                    "start": start,
                    "end": end,
                }
            )
        return entities

    def _generate_without_cache(self, ids: np.ndarray, max_new_tokens: int, eos: int | None) -> np.ndarray:
        """Greedy decoding by re-running the whole sequence (an export without a KV cache)."""
        for _ in range(max_new_tokens):
            feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
            token = int(self._run(feeds)["logits"][0, -1].argmax())
            ids = np.concatenate([ids, [[token]]], axis=1).astype(np.int64)
            if token == eos:
                break
        return ids


def _tokenizer(out_dir: Path, task: Task, config: Any) -> Any:
    """The folder's tokenizer (None without tokenizer files), padding on the right as the export was
    judged (exporter/validate/eval_set.py)."""
    if find_tokenizer(out_dir) is None:
        return None
    return task_tokenizer(out_dir, task, getattr(config, "pad_token_id", None))


def _eos_token_id(out_dir: Path, config: Any) -> int | None:
    """The first EOS id of generation_config.json (else config.json's)."""
    eos: Any = None
    if (out_dir / "generation_config.json").is_file():
        eos = json.loads((out_dir / "generation_config.json").read_text()).get("eos_token_id")
    if eos is None:
        eos = getattr(config, "eos_token_id", None)
    if isinstance(eos, list):
        eos = eos[0] if eos else None
    return None if eos is None else int(eos)
